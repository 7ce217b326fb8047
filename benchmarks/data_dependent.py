"""Data-dependent sizes: models whose memory depends on tensor values, predicted under the default policy
and at the sizes a real run produced, against the CPU profiler's peak of the same step.

Detectors size their region proposals, anchor matches and (Mask R-CNN) the proposals their mask head
trains on by values (``nonzero``, NMS), and a
value-routed mixture-of-experts layer gathers each expert's tokens by the router's choice. For each case:
- ``measure(..., device="cpu", record_data_dependent=True)`` runs the real step under the profiler and
  records every data-dependent size it produced;
- ``report(...)`` predicts with the default policy, the largest size each op allows: the prediction must be
  at or above the measured peak (an upper bound);
- ``report(..., data_dependent=<the recorded sizes>)`` predicts at the real run's sizes: target within 1%.

    python benchmarks/data_dependent.py             # all cases
    python benchmarks/data_dependent.py --only moe  # cases whose name contains "moe"
"""

from __future__ import annotations

import argparse
import time

from common import MiB, header, quiet_stderr

import torch
from tabulate import tabulate

import memtrace


def _images_and_targets(n: int, size: int, boxes: int):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(boxes, 2, generator=g) * size * 0.6
        wh = torch.rand(boxes, 2, generator=g) * size * 0.3 + 8
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 91, (boxes,), generator=g)})
    return images, targets


def faster_rcnn():
    import torchvision

    model = torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None, weights_backbone=None)
    return model, {"inputs": _images_and_targets(2, 320, 4)}


def retinanet():
    import torchvision

    model = torchvision.models.get_model("retinanet_resnet50_fpn", weights=None, weights_backbone=None,
                                         min_size=320, max_size=320)
    return model, {"inputs": _images_and_targets(2, 320, 4)}


def mask_rcnn():
    import torchvision

    model = torchvision.models.get_model("maskrcnn_resnet50_fpn", weights=None, weights_backbone=None,
                                         min_size=320, max_size=320)
    images, targets = _images_and_targets(2, 320, 4)
    for t in targets:
        t["masks"] = torch.zeros(len(t["boxes"]), 320, 320, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(t["boxes"].long().tolist()):
            t["masks"][k, y0:y1, x0:x1] = 1
    return model, {"inputs": (images, targets)}


def moe_layer():
    """Mixtral's sparse mixture-of-experts block with the eager experts, which pick each expert's tokens by
    value (8 experts, top 2, hidden 256, 1024 tokens)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=256, intermediate_size=512, num_local_experts=8, num_experts_per_tok=2)
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(config)
    return block, {"input_shape": (4, 256, 256), "loss_fn": lambda out, x: (out[0] if isinstance(out, tuple)
                                                                             else out).float().pow(2).mean()}


CASES = {"fasterrcnn_mobilenet_v3_320": faster_rcnn, "retinanet_resnet50_fpn_320": retinanet,
         "maskrcnn_resnet50_fpn_320": mask_rcnn, "mixtral_moe_eager": moe_layer}


def run_case(name: str, build) -> dict:
    model, kwargs = build()
    kwargs = {**kwargs, "optimizer": "sgd", "optimizer_kwargs": {"lr": 0.01, "momentum": 0.9}}
    row = {"case": name}
    t = time.perf_counter()
    with quiet_stderr():
        measured = memtrace.measure(model, device="cpu", record_data_dependent=True, **kwargs)
    row["measure_s"] = time.perf_counter() - t
    row["measured"] = measured.peak_bytes
    for label, policy in (("default", None), ("given", measured.data_dependent)):
        t = time.perf_counter()
        report = memtrace.report(model, device="cpu", data_dependent=policy, **kwargs)
        row[f"{label}_s"] = time.perf_counter() - t
        row[label] = report.peak_bytes
        row[f"{label}_error"] = 100.0 * (report.peak_bytes - measured.peak_bytes) / measured.peak_bytes
        row[f"{label}_choices"] = len(report.assumptions)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="cases whose name contains this")
    args = parser.parse_args()
    print("\n".join(header()))
    rows = [run_case(name, build) for name, build in CASES.items() if not args.only or args.only in name]
    table = [[r["case"], f"{r['measured'] / MiB:.2f}", f"{r['default'] / MiB:.2f}", f"{r['default_error']:+.2f}%",
              "yes" if r["default"] >= r["measured"] else "NO", f"{r['given'] / MiB:.2f}", f"{r['given_error']:+.3f}%",
              f"{r['given'] - r['measured']:+,}", f"{r['measure_s']:.1f} / {r['default_s']:.1f} / {r['given_s']:.1f}"]
             for r in rows]
    print(tabulate(table, headers=["case", "measured MiB", "default MiB", "default vs measured", "upper bound",
                                   "given sizes MiB", "given vs measured", "given - measured B",
                                   "time s (measure / default / given)"],
                   disable_numparse=True, colalign=("left",) + ("right",) * 8))
    worst = max(abs(r["given_error"]) for r in rows)
    print(f"\ntargets: every default at or above the measured peak "
          f"({'met' if all(r['default'] >= r['measured'] for r in rows) else 'MISSED'}); "
          f"every prediction at the real sizes within 1% ({'met' if worst <= 1 else 'MISSED'}, worst {worst:.3f}%)")


if __name__ == "__main__":
    main()
