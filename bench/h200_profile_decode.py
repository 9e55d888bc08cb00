"""Where one decode step's time goes: 8B-shape (8 layers, random weights, bf16) at 32K, HGA vs dense sdpa."""
import cProfile, pstats, time, io
import torch, kvtier, kvtier.hf
from transformers import LlamaConfig, AutoModelForCausalLM, DynamicCache
from torch.profiler import profile, ProfilerActivity
cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=1 << 20, rope_theta=5e5)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, attn_implementation="hga", dtype=torch.bfloat16).cuda().eval()
N = 32768
ids = torch.randint(0, 128000, (1, N), device="cuda")
for mode in ("hga", "dense"):
    model.set_attn_implementation("hga" if mode == "hga" else "sdpa")
    cache = (kvtier.hf.TieredCache(model.config, store=kvtier.StoreConfig(host_bytes="8GiB")) if mode == "hga"
             else DynamicCache(config=model.config))
    kw = kvtier.hf.cache_kwargs(model, cache)
    with torch.no_grad():
        t = time.time()
        for s in range(0, N, 8192):
            out = model(input_ids=ids[:, s:s + 8192], use_cache=True, logits_to_keep=1, **kw)
        torch.cuda.synchronize(); print(mode, "prefill s", round(time.time() - t, 2), flush=True)
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(8):
            out = model(input_ids=tok, use_cache=True, **kw); tok = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        t = time.time()
        for _ in range(16):
            out = model(input_ids=tok, use_cache=True, **kw); tok = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize(); print(mode, "ms/step", round((time.time() - t) / 16 * 1e3, 2), flush=True)
        pr = cProfile.Profile(); pr.enable()
        for _ in range(4):
            out = model(input_ids=tok, use_cache=True, **kw); tok = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize(); pr.disable()
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30); print(s.getvalue()[:9000])
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(4):
                out = model(input_ids=tok, use_cache=True, **kw); tok = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
        if mode == "hga":
            print({k: v for k, v in cache.stats().items() if k != "store"}); cache.close()
    del cache, kw
