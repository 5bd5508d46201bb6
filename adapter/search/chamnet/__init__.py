"""ChamNet: platform-aware adaptation of an architecture's hyper-parameters (Dai et al., CVPR 2019)."""
