"""GPU diagnostic: engine decode step vs the cache-less kernel path and the reference, bf16 and fp32."""
import torch, kvtier
from kvtier.config import HGAConfig
from kvtier.engine import engine_from_dense
for dt in (torch.float32, torch.bfloat16):
    for L in (2048 + 5, 8192 + 5):
        torch.manual_seed(0)
        k = torch.randn(1, 8, L, 128, device="cuda", dtype=dt); v = torch.randn_like(k)
        engine = engine_from_dense(k, v, config=HGAConfig(), num_q_heads=32, rope_theta=5e5, pin=True)
        with engine.store:
            dec = engine.decoder(0)
            dec.q.copy_(torch.randn(1, 32, 1, 128, device="cuda", dtype=dt))
            out = dec.step().clone()
            for backend in ("triton", "reference"):
                want, st = kvtier.hga_attention(dec.q, k, v, config=HGAConfig(), rope_theta=5e5, start_pos=L - 1, backend=backend)
                same = (dec.plan[1][:, :, 0].sort(-1).values == st.plan.group_ids[:, :, 0].sort(-1).values).all(-1)
                samec = (dec.plan[0][:, :, 0].sort(-1).values == st.plan.chunk_ids[:, :, 0].sort(-1).values).all(-1)
                print(dt, L, backend, "err", round((out.float() - want[:, :, 0].float()).abs().max().item(), 5),
                      "chunk rows equal", samec.float().mean().item(), "group rows equal", same.float().mean().item(), flush=True)
        engine.close()
