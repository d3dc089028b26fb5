from pruneware.cli import main

main()
