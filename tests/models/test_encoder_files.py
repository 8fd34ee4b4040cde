"""Encoder files: same weights, same bytes, in any process (DVC hashes them)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

SAVE = """
import torch, sys
from pathlib import Path
from retfm.models.encoder import Preprocessing, build_encoder, save_encoder
from retfm.settings import ModelPreset
arch = ModelPreset(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                   decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
torch.manual_seed(0)
save_encoder(Path(sys.argv[1]), build_encoder(arch), arch, Preprocessing(32),
             {"recipe": "r", "fingerprint": "f", "global_step": "3"})
"""


def test_the_same_weights_give_the_same_file_in_every_process(tmp_path: Path) -> None:
    digests = set()
    for i in range(3):  # safetensors orders its header differently from process to process
        path = tmp_path / f"e{i}.safetensors"
        subprocess.run([sys.executable, "-c", SAVE, str(path)], check=True)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1

    from retfm.models.encoder import load_encoder

    _, arch, prep, meta = load_encoder(tmp_path / "e0.safetensors")
    assert arch.embed_dim == 48 and prep.img_size == 32 and meta["global_step"] == "3"
    assert "mlflow_run_id" not in meta
