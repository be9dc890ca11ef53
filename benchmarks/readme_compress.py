"""The compressions behind the README table: CoMe default and faithful at about
10/20/30% of parameters (ratio 0.1/0.2/0.3 -> 26/22/19 of 30 layers), on the C4
calibration tokens of the reference fixture. CoMe is progressive, so one run to
30% saves the 10% and 20% points on the way (tests/test_come.py checks that a
snapshot equals a shorter run).

    python benchmarks/readme_compress.py
"""
import sys
from pathlib import Path

import torch

import come_fast
from come_fast.api import removals_for_ratio

CALIB = "../shared/fixtures/come_reference/calib_tokens.safetensors"
RATIOS = ("0.1", "0.2", "0.3")


def main():
    torch.set_num_threads(2)
    for mode in ("default", "faithful"):
        outs = {r: Path(f"out/come-{mode}-{r}") for r in RATIOS}
        if all((o / "config.json").is_file() for o in outs.values()):
            continue
        model, tok = come_fast.load_model("smollm2-135m")
        layers = {30 - removals_for_ratio(model, float(r)): r for r in RATIOS}

        def snapshot(partial):
            r = layers.get(partial.layers_after)
            if r is not None and r != RATIOS[-1]:
                come_fast.save(partial, outs[r], overwrite=True)
                print(f"{mode} {r}: {partial.summary()}", flush=True)

        res = come_fast.compress(model, ratio=float(RATIOS[-1]), calib=CALIB, tokenizer=tok,
                                 faithful=mode == "faithful", on_step=snapshot, backend="torch")
        come_fast.save(res, outs[RATIOS[-1]], overwrite=True)
        print(f"{mode} {RATIOS[-1]}: {res.summary()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
