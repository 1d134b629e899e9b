"""hiposeg: hierarchical prototype learning for semantic segmentation (HiPoSeg).

A segmentation model (DeepLabV3+ by default; HRNet, SegFormer, FPN, U-Net) trained with
cross-entropy plus a training-only branch of class prototypes at two levels of a label hierarchy.
The branch is stripped at export, so inference costs exactly what the plain model costs.
"""

__version__ = "0.1.0"
