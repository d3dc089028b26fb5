"""Integrations with serving engines and evaluation harnesses. Each one lives in its own
subpackage and is imported only by that tool, through its plugin entry point (`vllm`:
`vllm.general_plugins`; `lmms_eval`: `lmms_eval.models`): importing pruneware imports none of them.
"""
