"""The devices the op and layer tests run on: the CPU always, CUDA when there is a GPU. On a
device without kernels of its own the ops run their reference impls."""

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
