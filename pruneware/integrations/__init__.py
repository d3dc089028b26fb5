"""Integrations with serving engines. Each one lives in its own subpackage and is imported only
by that engine (for vLLM, through its plugin entry point): importing pruneware imports none of them.
"""
