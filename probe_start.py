"""Throwaway: process start to first token of LLM (llama-1b, bf16, default buckets)."""
import sys, time
t0 = float(sys.argv[1])
import torch
from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams
t1 = time.time()
llm = LLM("llama-1b", dtype="bfloat16", progress=False)
t2 = time.time()
out = llm.generate([[5, 6, 7, 8] * 8], SamplingParams(max_new_tokens=2, ignore_eos=True))
t3 = time.time()
print(f"start+imports {t1-t0:.1f} s, LLM() {t2-t1:.1f} s, first generate {t3-t2:.2f} s, process to first tokens {t3-t0:.1f} s", flush=True)
