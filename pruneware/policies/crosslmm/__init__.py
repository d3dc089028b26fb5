"""CrossLMM: the `crosslmm` policy (policy.py) and its trained V2V compressor (compressor.py,
imported only when a plan names one), trained by `pruneware train-adapter` (`pruneware.tuning.crosslmm`)."""

from pruneware.policies.crosslmm.policy import CrossLMMPolicy

__all__ = ["CrossLMMPolicy"]
