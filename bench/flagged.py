"""What the search's guarantee costs: the fraction of rows the Triton search flags and re-searches canonically.

    python bench/flagged.py [--rows N] [--max-codes K] [--json OUT.json]

A flagged row is one with more codes within the error bound of its best than the search keeps (module docstring of
vaekernels/triton/vq.py); it costs a CUDA-core sweep of its code range. Per GPU benchmark case (bench/roofline.py's
CASES: their K and D) x codebook x precision, with the split count of the GPU it runs on (without one, an H100's):
- random: codes and rows N(0, 1), a fresh codebook;
- clustered: trained-like codebooks with near-duplicates: centres, each with 16 (or 64) codes about 2% (or 10%) of
  its norm away (codes that training pulled to the same place), rows drawn around random codes. The search keeps
  16 candidates per row and split, so crowds of 64 within the bound of the best flag their rows.
On a GPU every row of the case is searched. Without one the kernels run in Triton's interpreter (slow): a sample of
`--rows` rows, and codebooks capped at `--max-codes`, as the output says.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

# codebook kind: None (random) or (codes per centre, their distance from the centre relative to its norm)
KINDS = {"random": None, "16 per centre at 2%": (16, 0.02), "16 per centre at 10%": (16, 0.1),
         "64 per centre at 2%": (64, 0.02)}


def codebook(kind: str, k: int, d: int, g: torch.Generator) -> torch.Tensor:
    """A codebook of k codes of d dims of one of KINDS."""
    if KINDS[kind] is None:
        return torch.randn(k, d, generator=g)
    size, spread = KINDS[kind]
    centres = torch.randn((k + size - 1) // size, d, generator=g)
    codes = centres.repeat_interleave(size, 0)[:k]
    return codes + spread * codes.norm(dim=1, keepdim=True) / d ** 0.5 * torch.randn(k, d, generator=g)


def rows(kind: str, n: int, cb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """n rows for `kind`: N(0, 1), or near random codes of the clustered codebook (a fifth of a code's norm away)."""
    if KINDS[kind] is None:
        return torch.randn(n, cb.shape[1], generator=g)
    near = cb[torch.randint(0, cb.shape[0], (n,), generator=g)]
    return near + 0.2 * near.norm(dim=1, keepdim=True) / cb.shape[1] ** 0.5 * torch.randn(near.shape, generator=g)


def measure(n: int, k: int, d: int, kind: str, precision: str, device: torch.device, splits: int) -> dict:
    from vaekernels.triton import vq

    g = torch.Generator().manual_seed(0)
    cb = codebook(kind, k, d, g)
    z = rows(kind, n, cb, g)
    forced = os.environ.get("VAEKERNELS_SEARCH_SPLIT")
    os.environ["VAEKERNELS_SEARCH_SPLIT"] = str(splits)
    try:
        flagged = vq.flagged_rows(z.to(device), cb.to(device), precision=precision)
    finally:
        if forced is None:
            del os.environ["VAEKERNELS_SEARCH_SPLIT"]
        else:
            os.environ["VAEKERNELS_SEARCH_SPLIT"] = forced
    return {"rows": n, "codes": k, "dim": d, "codebook": kind, "precision": precision, "splits": splits,
            "flagged": flagged, "fraction": flagged / n}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="rows per case without a GPU (default 64)")
    parser.add_argument("--max-codes", type=int, default=4096, help="codebook cap without a GPU (default 4096)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    from bench.roofline import CASES, DEVICES
    from vaekernels.triton import vq

    device = torch.device("cuda" if gpu else "cpu")
    out = []
    sample = "every row" if gpu else f"interpreter: {args.rows} rows, K capped at {args.max_codes}"
    print(f"flagged rows of the Triton search ({sample})")
    print("| case | N | K | D | splits | codebook | exact | tf32 | bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case, n, k, d in CASES:
        splits = vq.search_splits(n, k, device) if gpu else vq.split_count(n, k, DEVICES["h100"]["sms"])
        n, k = (n, k) if gpu else (min(n, args.rows), min(k, args.max_codes))
        for kind in KINDS:
            found = [dict(measure(n, k, d, kind, p, device, splits), case=case) for p in ("exact", "tf32", "bf16")]
            out += found
            cells = " | ".join(f"{r['fraction']:.1%}" for r in found)
            print(f"| {case} | {n} | {k} | {d} | {splits} | {kind} | {cells} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
