"""MAR: masked autoregressive generation over continuous tokens with a diffusion head
(Li et al. 2024, arXiv 2406.11838), plus the D2C fusion hooks (docs/design.md sections 3-4).

Parameter names are those of LTH14/mar `models/mar.py` (ViT blocks with timm's names), so a
public MAR checkpoint loads with strict=True when `config.fusion.kind == "none"`.

Training step (`forward`):
  latents (B, C, h, w) -> tokens (B, L, C); one mask ratio r ~ TruncNormal(1, 0.25, [r_min, 1])
  per batch, ceil(r L) tokens masked along a random order per sample;
  encoder: [buffer | z_proj(tokens)] + pos, LayerNorm, *masked tokens dropped* (MAE), ViT blocks;
  the `buffer_size` buffer slots hold the class embedding (`fake_latent` for dropped labels);
  decoder: kept tokens back in place, mask_token elsewhere, + pos, ViT blocks; the outputs
  at the token positions + diffusion pos are the per-token conditions z;
  loss: DiffLoss on (target token, z), `diffusion_batch_mul` draws each, masked tokens only.
Fusion (kind != "none", d2c.models.fusion): disc = fusion.embed(codes, drop) once, then two hooks:
fill_buffer (qformer: its outputs added to the first num_queries buffer slots) and
after_decoder_block (cross_attn: after the chosen decoder blocks); each is the identity elsewhere.
Sampling (`sample_tokens`, MAR's name): rounds of the encoder/decoder on the known tokens and
the diffusion head on the tokens whose turn has come (sec. 3.4).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from d2c.config import MARConfig, validate
from d2c.models import check_ids, compiled
from d2c.models.diffloss import DiffLoss
from d2c.models.fusion import build_fusion
from d2c.models.vit import Block


ENCODER_BUCKET = 64          # compiled CUDA sampling pads the encoder's rows to a multiple of this


def _std_normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


# ------------------------------------------------------------------ MAR
class MAR(nn.Module):
    def __init__(self, config: MARConfig):
        super().__init__()
        validate(config)
        self.config = config
        E, D = config.encoder_embed_dim, config.decoder_embed_dim
        self.vae_embed_dim = config.vae_embed_dim
        self.patch_size = config.patch_size
        self.seq_h = self.seq_w = config.seq_h
        self.seq_len = config.seq_len
        self.token_embed_dim = config.token_embed_dim
        self.buffer_size = config.buffer_size
        self.num_classes = config.class_num
        self.label_drop_prob = config.label_drop_prob
        self.mask_ratio_min = config.mask_ratio_min
        self.diffusion_batch_mul = config.diffusion_batch_mul
        self.grad_checkpointing = config.grad_checkpointing

        # class embedding; `fake_latent` is the null class for CFG
        self.class_emb = nn.Embedding(config.class_num, E)
        self.fake_latent = nn.Parameter(torch.zeros(1, E))

        # encoder
        n_pos = self.seq_len + self.buffer_size
        self.z_proj = nn.Linear(self.token_embed_dim, E)
        self.z_proj_ln = nn.LayerNorm(E, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n_pos, E))
        self.encoder_blocks = nn.ModuleList([
            Block(E, config.encoder_num_heads, config.mlp_ratio, config.attn_dropout, config.proj_dropout)
            for _ in range(config.encoder_depth)])
        self.encoder_norm = nn.LayerNorm(E, eps=1e-6)

        # decoder
        self.decoder_embed = nn.Linear(E, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n_pos, D))
        self.decoder_blocks = nn.ModuleList([
            Block(D, config.decoder_num_heads, config.mlp_ratio, config.attn_dropout, config.proj_dropout)
            for _ in range(config.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(D, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, D))
        self.initialize_weights()

        # diffusion head (own init) and fusion (own zero-init): built after MAR's init
        self.diffloss = DiffLoss(self.token_embed_dim, D, config.diffloss_d, config.diffloss_w,
                                 config.diffusion_steps, grad_checkpointing=config.grad_checkpointing,
                                 clip_x0=config.clip_x0)
        self.fusion = build_fusion(config)                # None for kind "none": plain MAR

    def initialize_weights(self):
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):          # xavier, as JAX ViT / MAR
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -------------------------------------------------------------- tokens <-> latents
    def patchify(self, x):
        """(B, C, h, w) -> (B, (h/p)(w/p), C p^2), channel-major within a patch (MAR)."""
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x):
        b, p, c = x.shape[0], self.patch_size, self.vae_embed_dim
        x = x.reshape(b, self.seq_h, self.seq_w, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, self.seq_h * p, self.seq_w * p)

    # -------------------------------------------------------------- masking
    def sample_orders(self, bsz: int, generator=None, device=None):
        """One random generation order (a permutation of token indices) per sample."""
        if device is None:
            device = generator.device if generator is not None else self.mask_token.device
        # argsort of i.i.d. uniforms is a uniform random permutation per row, in one launch
        return torch.rand(bsz, self.seq_len, generator=generator, device=device).argsort(dim=1)

    def sample_mask_ratio(self, n: int = 1, generator=None):
        """n draws (float64, CPU) of r ~ N(1, 0.25^2) truncated to [mask_ratio_min, 1], by inverse CDF."""
        lo, hi = _std_normal_cdf((self.mask_ratio_min - 1.0) / 0.25), _std_normal_cdf(0.0)
        u = torch.rand(n, dtype=torch.float64, device="cpu", generator=generator)
        return 1.0 + 0.25 * torch.special.ndtri(lo + u * (hi - lo))

    def random_masking(self, x, orders):
        """mask (B, L) float, 1 = masked: the first ceil(r L) tokens of each order, r shared by the batch."""
        b, L = x.shape[:2]
        n = min(L, math.ceil(L * float(self.sample_mask_ratio(1))))
        mask = torch.zeros(b, L, device=x.device)
        return mask.scatter(1, orders[:, :n], 1.0)

    # -------------------------------------------------------------- checks
    def _check_codes(self, codes, bsz: int):
        cs = self.config.fusion.codebook_size
        if codes is None:
            raise ValueError(f"this model has fusion={self.config.fusion.kind!r}: pass codes (B, {self.seq_len}) "
                             f"with values in [0, {cs - 1}]")
        codes = codes.reshape(codes.shape[0], -1) if codes.dim() > 1 else codes
        if codes.dim() != 2 or tuple(codes.shape) != (bsz, self.seq_len):
            raise ValueError(f"codes must have shape ({bsz}, {self.seq_len}); got {tuple(codes.shape)}")
        check_ids(codes, cs - 1, "codes", f" (fusion.codebook_size={cs})")
        return codes.long()

    # -------------------------------------------------------------- encoder / decoder
    def _run(self, blk, x, key_padding_mask=None):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, x, key_padding_mask, use_reentrant=False)
        return blk(x, key_padding_mask)

    @staticmethod
    def _gather_kept(x, keep, pad_to: int | None = None):
        """Kept rows of x (B, N, E) packed to the front, in position order.  When rows keep
        different counts, or `pad_to` asks for more rows, pad (with dropped rows, up to N) and
        return `valid` (B, K) for key_padding_mask."""
        n_keep = keep.sum(1)
        lo, hi = torch.stack([n_keep.min(), n_keep.max()]).tolist()
        if pad_to is not None:
            hi = max(hi, min(pad_to, x.shape[1]))
        idx = torch.argsort(keep.logical_not().to(torch.uint8), dim=1, stable=True)[:, :hi]
        x = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
        valid = None if lo == hi else torch.arange(hi, device=x.device)[None] < n_keep[:, None]
        return x, idx, valid

    def forward_mae_encoder(self, tokens, mask, class_embedding, disc=None, pad_to=None):
        x = self.z_proj(tokens)
        b, L, e = x.shape
        buf = class_embedding[:, None, :].to(x.dtype).expand(b, self.buffer_size, e)
        if self.fusion is not None:
            buf = self.fusion.fill_buffer(buf, disc)          # qformer: queries added to the first slots
        x = self.z_proj_ln(torch.cat([buf, x], dim=1) + self.encoder_pos_embed_learned)
        keep = torch.cat([mask.new_zeros(b, self.buffer_size), mask], dim=1).logical_not()
        x, idx, valid = self._gather_kept(x, keep, pad_to)    # MAE: masked tokens never enter
        for blk in self.encoder_blocks:
            x = self._run(blk, x, valid)
        return self.encoder_norm(x), idx, valid

    def forward_mae_decoder(self, x, idx, valid, disc=None):
        x = self.decoder_embed(x)
        b, _, d = x.shape
        mask_token = self.mask_token.to(x.dtype)
        if valid is not None:                                  # padding slots write mask tokens
            x = torch.where(valid[..., None], x, mask_token)
        full = mask_token.expand(b, self.seq_len + self.buffer_size, d)
        x = torch.scatter(full, 1, idx[..., None].expand(-1, -1, d), x) + self.decoder_pos_embed_learned
        for i, blk in enumerate(self.decoder_blocks):
            x = self._run(blk, x)
            if self.fusion is not None:
                x = self.fusion.after_decoder_block(i, x, disc)   # cross_attn: fusion layer i
        x = self.decoder_norm(x)
        return x[:, self.buffer_size:] + self.diffusion_pos_embed_learned

    def condition(self, tokens, labels, mask, codes=None, drop=None, pad_to=None):
        """Per-token diffusion conditions z (B, seq_len, decoder_embed_dim).

        tokens (B, seq_len, token_embed_dim); labels (B,) long or None (all unconditional);
        mask (B, seq_len), 1/True = masked (unknown, dropped from the encoder); codes (B, seq_len)
        stage-1 codes (fusion models only; ignored when fusion is "none"); drop (B,) bool: rows
        that see the null class *and* the null codes (CFG's unconditional half, label drop).
        pad_to: the encoder runs on at least this many rows, the extra ones masked out of
        attention, so compiled sampling sees a few lengths instead of one a round.
        """
        b = tokens.shape[0]
        mask = mask.to(device=tokens.device).bool()
        if labels is None:
            labels = torch.zeros(b, dtype=torch.long, device=tokens.device)
            drop = torch.ones(b, dtype=torch.bool, device=tokens.device)
            if self.fusion is not None and codes is None:
                codes = torch.zeros(b, self.seq_len, dtype=torch.long, device=tokens.device)
        check_ids(labels, self.num_classes - 1, "labels", f" (class_num={self.num_classes})")
        class_embedding = self.class_emb(labels)
        if drop is not None:
            drop = drop.to(device=tokens.device).bool()
            class_embedding = torch.where(drop[:, None], self.fake_latent.to(class_embedding.dtype), class_embedding)
        disc = None
        if self.fusion is not None:
            disc = self.fusion.embed(self._check_codes(codes, b), drop)
        x, idx, valid = self.forward_mae_encoder(tokens, mask, class_embedding, disc, pad_to)
        return self.forward_mae_decoder(x, idx, valid, disc)

    # -------------------------------------------------------------- training
    def forward_loss(self, z, target, mask):
        """DiffLoss over all tokens, weighted by mask, each repeated diffusion_batch_mul times."""
        b, L, _ = target.shape
        m = self.diffusion_batch_mul
        return self.diffloss(target.reshape(b * L, -1).repeat(m, 1), z.reshape(b * L, -1).repeat(m, 1),
                             mask.reshape(b * L).repeat(m))

    def forward(self, latents, labels, codes=None):
        """Training loss for KL latents (B, C, h, w) and labels (B,); codes (B, seq_len) for fusion."""
        x = self.patchify(latents)
        target = x.detach()
        b = x.shape[0]
        orders = self.sample_orders(b, device=x.device)
        mask = self.random_masking(x, orders)
        drop = (torch.rand(b, device=x.device) < self.label_drop_prob) if self.training else None
        z = self.condition(x, labels, mask, codes=codes, drop=drop)
        return self.forward_loss(z, target, mask)

    # -------------------------------------------------------------- sampling
    @torch.inference_mode()
    def sample_tokens(self, labels, sampler, *, codes=None, generator=None, progress: bool = False):
        """MAR's sampler (Li et al. 2024, sec. 3.4) at the stage-2 settings of `sampler` (a
        d2c.sampling.SamplerConfig): `steps` rounds; each round runs the MAE encoder/decoder on
        the tokens known so far and samples, with the diffusion head, the tokens whose turn has
        come in a random order per sample.  The masked count after round k follows MaskGIT's
        cosine schedule floor(L cos(pi/2 (k+1)/steps)), clamped to [1, masked - 1]; the last round
        predicts every remaining token.  CFG (cfg != 1): a [cond; uncond] batch, the
        unconditional half with the null class and null codes, guidance scale linear in the
        revealed fraction, 1 + (cfg - 1)(L - masked_next)/L (cfg_schedule "linear"), or `cfg`
        throughout ("constant").  temperature: the head's (MAR's tau).

        labels (B,) long; codes (B, seq_len) stage-1 codes (required by fusion models).  All
        randomness comes from `generator` (on the model's device), so a seed reproduces the output.
        Returns (latents (B, C, h, w), {"mar_steps", "reverse_steps"}): reverse_steps counts every
        reverse step run by the head over all rounds (one batched head call per step).
        diffusion_steps: the head's respaced steps per token (None: the preset's).
        head_sampler: the head's reverse process, ddpm (MAR's) or ddim (eta 0), see DiffLoss.sample.
        diffusion_steps_last: the head's step count falls linearly over the rounds, from
        `diffusion_steps` in the first to this in the last (DiSA, arXiv 2505.20297: later tokens
        have sharper conditionals and need fewer steps); None: the same count every round.
        uncond_refresh: LazyMAR's condition cache (arXiv 2503.12450): the difference between the
        unconditional and conditional z changes little between rounds, so under CFG the
        unconditional half runs only every `uncond_refresh` rounds (from the first); the rounds
        between run the conditional half alone and take z_uncond = z_cond + (z_uncond - z_cond) of
        the last full round.  1 runs both halves every round, as None does.  The difference shrinks
        as tokens become known, so a long period also guides harder (README, "Sampling faster").
        compile: the encoder/decoder under torch.compile (dynamic shapes) and the diffusion
        head's fused step compiled (CPU) or captured as a CUDA graph (GPU); same seed, same tokens
        up to float reassociation.
        """
        sampler.check(stage2=True)
        steps, cfg, temperature, compile = sampler.steps, sampler.cfg, sampler.temperature, sampler.compile
        uncond_refresh, diffusion_steps_last = sampler.uncond_refresh, sampler.diffusion_steps_last
        device = self.mask_token.device
        labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
        b, L, c = labels.shape[0], self.seq_len, self.token_embed_dim
        if codes is not None:
            codes = torch.as_tensor(codes, device=device).reshape(b, -1)
        guided = cfg != 1.0
        diffusion_steps = int(sampler.diffusion_steps or self.diffloss.diffusion_steps)

        tokens = torch.zeros(b, L, c, device=device)
        mask = torch.ones(b, L, dtype=torch.bool, device=device)
        orders = self.sample_orders(b, generator=generator, device=device)
        if guided:
            labels_in = torch.cat([labels, labels])
            drop = torch.cat([torch.zeros(b, dtype=torch.bool, device=device),
                              torch.ones(b, dtype=torch.bool, device=device)])
            codes_in = None if codes is None else torch.cat([codes, codes])
        else:
            labels_in, drop, codes_in = labels, None, codes

        # compiled on CUDA: static shapes, the encoder padded to multiples of ENCODER_BUCKET rows,
        # so a run compiles a few graphs (bucket x batch) and none a round; elsewhere one dynamic graph
        static = compile and device.type == "cuda"
        condition = compiled(self, "condition", dynamic=not static) if compile else self.condition
        head_impl = ("graph" if device.type == "cuda" else "compiled") if compile else None
        rounds = range(steps)
        if progress:
            from tqdm.auto import tqdm
            rounds = tqdm(rounds, desc="mar")
        n_masked, reverse_steps = L, 0
        delta = None                                                   # uncond_refresh's cache
        for step in rounds:
            if n_masked == 0:
                break
            rows = self.buffer_size + L - n_masked                     # what the encoder keeps
            pad_to = -(-rows // ENCODER_BUCKET) * ENCODER_BUCKET if static else None
            if guided and uncond_refresh is not None and step % uncond_refresh:
                zc = condition(tokens, labels, mask, codes=codes, drop=drop[:b], pad_to=pad_to)
                z = torch.cat([zc, (zc.float() + delta).to(zc.dtype)])
            else:
                tok_in, mask_in = (torch.cat([tokens, tokens]), torch.cat([mask, mask])) if guided else (tokens, mask)
                z = condition(tok_in, labels_in, mask_in, codes=codes_in, drop=drop, pad_to=pad_to)
                if guided and uncond_refresh is not None:
                    delta = z[b:].float() - z[:b].float()

            # masked count after this round; every row has the same count (orders differ)
            n_next = math.floor(L * math.cos(math.pi / 2 * (step + 1) / steps))
            n_next = max(1, min(n_masked - 1, n_next))
            if step == steps - 1:
                to_pred, mask_next = mask, torch.zeros_like(mask)
            else:
                mask_next = torch.zeros_like(mask).scatter(1, orders[:, :n_next], True)
                to_pred = mask & ~mask_next
            scale = 1 + (cfg - 1) * (L - n_next) / L if sampler.cfg_schedule == "linear" else cfg

            n_diff = diffusion_steps if diffusion_steps_last is None or steps == 1 else \
                round(diffusion_steps + (diffusion_steps_last - diffusion_steps) * step / (steps - 1))

            zc = z[:b][to_pred]                                        # row-major: matches tokens[to_pred]
            if zc.shape[0]:
                zz = torch.cat([zc, z[b:][to_pred]]) if guided else zc
                x = self.diffloss.sample(zz, temperature, scale, generator=generator,
                                          diffusion_steps=n_diff, guided=guided, impl=head_impl,
                                          sampler=sampler.head_sampler)
                tokens[to_pred] = x[:zc.shape[0]].to(tokens.dtype)
                reverse_steps += n_diff
            mask = mask_next
            n_masked = 0 if step == steps - 1 else n_next
        return self.unpatchify(tokens), {"mar_steps": steps, "reverse_steps": reverse_steps}
