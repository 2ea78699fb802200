"""Mixed precision: the precision policy seam and cluster-wide loss scaling."""

from tessera.amp.finite import all_finite
from tessera.amp.policy import PrecisionPolicy, make_policy
from tessera.amp.scaler import LossScaler

__all__ = ["PrecisionPolicy", "make_policy", "LossScaler", "all_finite"]
