"""Data-parallel training in bae_core on a real torch.distributed process group (gloo, two processes)."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bae_core import CoderConfig, TrainConfig, Trainer, build_coder


def _worker(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        data = torch.randn(2, 64, 16)  # the same on both ranks: each trains on its own half
        cfg = CoderConfig(activation="binary_topk", k=4, num_latents=64)
        trainer = Trainer(build_coder(cfg, 16, seed=0), TrainConfig(optimizer="adam", lr=1e-3, log_every=0))
        trainer.distribute(data[rank])
        trainer.step(data[rank])
        # What one process computes alone on each half, for comparison.
        alone = [build_coder(cfg, 16, seed=0) for _ in range(2)]
        fired = []
        for half, coder in zip(data, alone, strict=True):
            coder.load_state_dict(_initial_state(cfg, data[0]))
            fired.append(coder.encode(half).firing_counts(64))
        out[rank] = {
            "tokens": trainer.tokens_seen,
            "firing": trainer.firing_counts.tolist(),
            "expected_firing": (fired[0] + fired[1]).tolist(),
            "weights": trainer.coder.W_dec.detach().clone(),
        }
    finally:
        dist.destroy_process_group()


def _initial_state(cfg, first_batch):
    """The coder as `distribute` leaves it before the first step: rank 0's data-dependent initialisation."""
    trainer = Trainer(build_coder(cfg, 16, seed=0), TrainConfig(optimizer="adam", lr=1e-3, log_every=0))
    trainer._prepare(first_batch, None)
    return trainer.coder.state_dict()


def test_workers_agree_on_weights_tokens_and_firing_counts():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
    first, second = out[0], out[1]
    # Tokens and firing counts are the global ones, the same on both workers.
    assert first["tokens"] == second["tokens"] == 128
    assert first["firing"] == second["firing"] == first["expected_firing"]
    assert sum(first["firing"]) == 128 * 4
    torch.testing.assert_close(first["weights"], second["weights"], rtol=0, atol=0)
