"""Dense sdpa + DynamicCache decode step, 8B shape (8 layers, random bf16), with cuDNN attention off (flash/efficient)."""
import time, torch, kvtier.hf
from transformers import LlamaConfig, AutoModelForCausalLM, DynamicCache
cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=1 << 20, rope_theta=5e5)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16).cuda().eval()
for cudnn in (True, False):
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    for N in (4096, 32768, 131072):
        ids = torch.randint(0, 128000, (1, N), device="cuda")
        cache = DynamicCache(config=model.config); kw = kvtier.hf.cache_kwargs(model, cache)
        with torch.no_grad():
            for s in range(0, N, 8192):
                out = model(input_ids=ids[:, s:s + 8192], use_cache=True, logits_to_keep=1, **kw)
            tok = out.logits[:, -1:].argmax(-1)
            ms = []
            for i in range(40):
                torch.cuda.synchronize(); t = time.perf_counter()
                out = model(input_ids=tok, use_cache=True, **kw); tok = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize(); ms.append((time.perf_counter() - t) * 1e3)
        ms = sorted(ms[8:])
        print(f"cudnn_sdp={cudnn} context={N} dense ms/step median {ms[len(ms)//2]:.2f}", flush=True)
        del cache, kw, out; torch.cuda.empty_cache()
