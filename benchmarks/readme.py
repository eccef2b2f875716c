"""Quote benchmarks/results/*.md in README.md between the BENCHMARKS markers (run by `make bench`)."""

from __future__ import annotations

from pathlib import Path

ORDER = [
    ("fast-1b-cpu.md", "Fast data path on the 2-core box (issue 13; merge + export, merge + nf4 + export, nf4)"),
    ("device/fast-7b-cuda-merged.md", "Fast data path, 7B on one H100 with merge + bnb 4-bit beside its checks (issue 13; merge on the CPU, bnb on CUDA)"),
    ("device/fast-7b-cuda-beside.md", "Fast data path, 7B on one H200 with the checks beside the units, which run on guessed plans (issue 13; merge on the CPU, bnb on CUDA)"),
    ("device/fast-7b-cuda-memo.md", "Fast data path, 7B on one H200 with the plans memoised, at most 8 GPU units at once and glibc's large blocks reused (issue 13; merge on the CPU, bnb on CUDA)"),
    ("device/fast-7b-cuda-gpu-threads.md", "GPU units at once in the local executor: time and peak RSS of 7B nf4 builds (issue 13)"),
    ("device/fast-7b-cuda-overlap.md", "Fast data path, 7B on one H200 with the checks' imports beside the source hashing and units in whole waves (issue 13; merge on the CPU, bnb on CUDA)"),
    ("device/fast-7b-cuda-prepared.md", "Fast data path, 7B on one H200 with units started together and PEFT imported without bitsandbytes (issue 13; merge on the CPU, bnb on CUDA)"),
    ("device/fast-7b-cuda-fused.md", "Fast data path, 7B on one H200 with merge -> quantize fused (issue 13; merge on the CPU, bnb on CUDA)"),
    ("device/fast-7b-cuda-streamed.md", "Fast data path, 7B on one H200 with the row-streamed merge (issue 13; merge on the CPU, bnb on CUDA)"),
    ("device/fast-7b-cuda.md", "Fast data path, 7B on one H200, the same day before the row-streamed merge (issue 13; merge on the CPU, bnb on CUDA)"),
    ("device/fast-7b-gpu-merge.md", "Fast data path, 7B on one H200, an earlier run with the merge on the GPU (pageable copies; not bit-identical in general, see merge.backend)"),
    ("memo.md", "Derived-plans memo off and on: cold Ray builds on the 2-core box (issue 13; its workers load the plans the checks stored)"),
    ("dag.md", "Concurrent DAG: a 3-target matrix on a 3-node Ray cluster against its longest chain (issue 14)"),
    ("driver.md", "The driver's share of a Ray build on a 3-node cluster (issue 14)"),
    ("reshard.md", "Re-shard/export (issue: foundation)"),
    ("merge.md", "LoRA merge + export"),
    ("quantize.md", "NF4 quantization"),
    ("ray.md", "Local vs Ray executor"),
    ("chaos.md", "Faults and hostile input (tests/chaos)"),
    ("device/merge-7b-h200x2.md", "7B merge on a GPU host (local executor)"),
    ("device/merge-7b-h200x2-ray.md", "7B merge on a GPU host (Ray executor; RSS is the driver's only)"),
    ("device/quantize-7b-h200x2.md", "7B NF4 on a GPU host (CUDA backend, local executor)"),
    ("device/scale-7b-h200x2.md", "7B merge + NF4 + export through Ray on 1 and 2 GPUs"),
    ("device/verify-7b-h200.md", "verify's share of a 7B merge + NF4 + export build (1x H200, local executor)"),
]
BEGIN, END = "<!-- BENCHMARKS:BEGIN -->", "<!-- BENCHMARKS:END -->"


def main(argv: list[str] | None = None) -> None:
    results = Path("benchmarks/results")
    parts = []
    for name, title in ORDER:
        path = results / name
        if path.exists():
            parts.append(f"**{title}** (`benchmarks/results/{name}`)\n\n{path.read_text().strip()}\n")
    readme = Path("README.md")
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + BEGIN + "\n" + "\n".join(parts) + END + tail)


if __name__ == "__main__":
    main()
