"""Tiny random-init diffusers pipelines built from configs for the accelerate tests (nothing is
downloaded): SD 1.x/2.x and SDXL U-Nets, SD3 and Flux transformers, and tiny CLIP text encoders
with a character-level tokenizer written to a temporary folder."""
import json
import string

import diffusers
import pytest
import torch
import transformers

VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4,
           norm_num_groups=32)
CLIP = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=16, pad_token_id=1, bos_token_id=0, eos_token_id=1, projection_dim=16)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes: threads would only spin against each other on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise(model, seed=1):
    """Zero-initialised layers (conv_out, out-projections, adaLN) would hide differences."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def tokenizer(folder):
    """A CLIP tokenizer over single characters (no merges): any lowercase prompt tokenizes."""
    chars = list(string.ascii_lowercase)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars + [c + "</w>" for c in chars]:
        vocab[c] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def clip(folder, with_projection=False, seed=2):
    tok = tokenizer(folder)
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(vocab_size=len(tok), **CLIP)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return randomise(cls(cfg), seed), tok


def sd(scheduler, folder=None, cross_dim=32):
    """SD 1.x/2.x-shaped; with a text encoder when `folder` is given (else prompt embeddings)."""
    torch.manual_seed(0)
    unet = randomise(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, norm_num_groups=32, attention_head_dim=8))
    vae = randomise(diffusers.AutoencoderKL(**VAE), 3)
    encoder, tok = clip(folder) if folder is not None else (None, None)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tok, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_img2img(scheduler, folder=None):
    """StableDiffusionImg2ImgPipeline on `sd`'s components."""
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**sd(scheduler, folder).components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl(scheduler, folder, cls=diffusers.StableDiffusionXLPipeline, **pipe_kw):
    """SDXL-shaped: text_time added conditioning, two CLIP encoders (the second with projection).
    `cls`: StableDiffusionXLImg2ImgPipeline for img2img; with requires_aesthetics_score=True its
    time ids hold an aesthetic score in place of the target size (5 ids, as the refiner's)."""
    ids = 5 if pipe_kw.get("requires_aesthetics_score") else 6
    torch.manual_seed(0)
    unet = randomise(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, norm_num_groups=32, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=ids * 8 + CLIP["projection_dim"]))
    vae = randomise(diffusers.AutoencoderKL(**VAE), 3)
    enc, tok = clip(folder / "one")
    enc2, tok2 = clip(folder / "two", with_projection=True, seed=4)
    pipe = cls(vae=vae, text_encoder=enc, text_encoder_2=enc2, tokenizer=tok, tokenizer_2=tok2, unet=unet,
               scheduler=scheduler, add_watermarker=False, **pipe_kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_transformer(**overrides):
    """SD3-shaped MMDiT (the last block context_pre_only); SD3.5's qk_norm / dual attention as overrides."""
    torch.manual_seed(0)
    return randomise(diffusers.SD3Transformer2DModel(**{**dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
        pos_embed_max_size=8), **overrides}))


def sd3(scheduler):
    """SD3-shaped MMDiT; no text encoders (prompt and pooled embeddings are given)."""
    transformer = sd3_transformer()
    vae = randomise(diffusers.AutoencoderKL(**VAE, shift_factor=0.06, scaling_factor=1.5), 3)
    pipe = diffusers.StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None,
                                              tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                              text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_transformer(guidance_embeds=True):
    """Flux-shaped: one double-stream and one single-stream block, rotary embedding over 3 axes."""
    torch.manual_seed(0)
    return randomise(diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8)))


def flux(scheduler, guidance_embeds=True):
    """Flux-shaped: double- and single-stream blocks, rotary ids, packed latents (4 channels in
    2x2 patches); no text encoders."""
    transformer = flux_transformer(guidance_embeds)
    vae = randomise(diffusers.AutoencoderKL(**VAE, shift_factor=0.06, scaling_factor=1.5), 3)
    pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
