"""hiposeg: hierarchical prototype learning for semantic segmentation (HiPoSeg).

DeepLabV3+ trained with cross-entropy plus a training-only branch of class prototypes at two
levels of a label hierarchy. The branch is stripped at export, so inference costs exactly what a
plain DeepLabV3+ costs.
"""

__version__ = "0.1.0"
