"""Throwaway GPU probe: where an extend step's time goes (build, forward, sample), then a profiler table."""
import sys, time
import torch
from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams

MODEL = sys.argv[1] if len(sys.argv) > 1 else "llama-1b"
cuda = torch.cuda.is_available()
llm = LLM(MODEL, device="cuda" if cuda else None, dtype="bfloat16" if cuda else None, max_batch_size=64, progress=False, cuda_graphs=False if len(sys.argv) > 2 else None)
print("backend", llm.runner.backend if hasattr(llm.runner, "backend") else [k for k in vars(llm.runner)], flush=True)
gen = torch.Generator().manual_seed(1)
def prompts(n, length):
    return torch.randint(2, 300, (n, length), generator=gen).tolist()
one = SamplingParams(max_new_tokens=1, ignore_eos=True)
for _ in range(2):
    llm.generate(prompts(1, 32), one); llm.generate(prompts(8, 32), one)
sync = torch.cuda.synchronize if cuda else (lambda: None)
runner, builder = llm.runner, llm.runner.builder
for n in (1, 8, 64):
    rows = []
    for _ in range(5):
        reqs = [builder.new_request() for _ in range(n)]
        toks = prompts(n, 32)
        sync(); t0 = time.perf_counter()
        with torch.inference_mode():
            batch = builder.extend(reqs, toks)
            t1 = time.perf_counter()
            logits = runner.forward(batch)
            t2 = time.perf_counter()
            sync(); t3 = time.perf_counter()
            out = llm.sampler(logits, [one] * n, [None] * n)
            t4 = time.perf_counter()
        rows.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3))
        for r in reqs:
            builder.release(r)
    med = [sorted(c)[2] * 1e3 for c in zip(*rows)]
    print(f"extend {n} x 32: build {med[0]:.2f} ms, forward launch {med[1]:.2f} ms, wait GPU {med[2]:.2f} ms, sample {med[3]:.2f} ms", flush=True)
if len(sys.argv) > 2:
    sys.exit(0)
from torch.profiler import profile, ProfilerActivity
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
reqs = [builder.new_request()]
with torch.inference_mode(), profile(activities=acts) as prof:
    batch = builder.extend(reqs, prompts(1, 32))
    logits = runner.forward(batch)
    sync()
builder.release(reqs[0])
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=70))
