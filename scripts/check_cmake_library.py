"""Loads the CMake-built CPU library into a fresh torch and checks one op against the reference."""

import importlib.util
import pathlib
import sys

import torch

torch.ops.load_library(sys.argv[1])

# reference.py alone, by path: importing the aqlm_lora package would load its own _C too, and a second
# TORCH_LIBRARY(aqlm_lora) next to the library under test aborts the process.
path = pathlib.Path(__file__).resolve().parent.parent / "aqlm_lora" / "reference.py"
spec = importlib.util.spec_from_file_location("aqlm_lora_reference", path)
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)

codes = torch.randint(-128, 128, (16, 4, 2), dtype=torch.int8)
codebooks = torch.randn(2, 256, 1, 8)
scales = torch.rand(16, 1, 1, 1)
x = torch.randn(5, 32)
out = torch.ops.aqlm_lora.aqlm_gemm(x, codes, codebooks, scales, None)
torch.testing.assert_close(out, ref.aqlm_gemm(x, codes, codebooks, scales, None))
print(f"{sys.argv[1]}: loads, aqlm_gemm matches the reference")
