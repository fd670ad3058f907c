"""Plain-torch backbone loaders: official key layouts, local weights, strictness, safety.

Everything runs on random weights (no downloads). The official names and shapes hard-coded
below were read from facebookresearch/dinov2 (dinov2/models/vision_transformer.py,
dinov2/layers/*.py, dinov2/hub/backbones.py), facebookresearch/dino (vision_transformer.py,
hubconf.py), openai/CLIP (clip/model.py, clip/clip.py) and pytorch/vision
(torchvision/models/resnet.py).
"""

from __future__ import annotations

import builtins
import importlib.util
import pickle

import pytest
import torch

from imgclust.backbones import available_backbones, build_backbone
from imgclust.backbones.weights import file_digest
from imgclust.errors import ImgclustError, InputError, WeightsError

torch.set_num_threads(2)


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def _save(tmp_path, obj, name="w.pth"):
    p = tmp_path / name
    torch.save(obj, p)
    return p


def _x(size, n=2, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------- registry


def test_all_entries_registered():
    names = {i.name for i in available_backbones()}
    expected = {
        "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14",
        "dinov2_vits14_reg", "dinov2_vitb14_reg", "dinov2_vitl14_reg", "dinov2_vitg14_reg",
        "dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8",
        "clip_vitb32", "clip_vitb16", "clip_vitl14", "clip_vitl14_336",
        "resnet18", "resnet34", "resnet50", "mocov2_resnet50", "dino_resnet50", "timm",
    }  # fmt: skip
    assert expected <= names


# ---------------------------------------------------------------------------------- DINOv2 ViT

DINOV2_VITS14_OFFICIAL = {
    "cls_token": (1, 1, 384),
    "pos_embed": (1, 1370, 384),  # 518 px / 14 = 37x37 patches + CLS
    "mask_token": (1, 384),
    "patch_embed.proj.weight": (384, 3, 14, 14),
    "patch_embed.proj.bias": (384,),
    "blocks.0.norm1.weight": (384,),
    "blocks.0.attn.qkv.weight": (1152, 384),
    "blocks.0.attn.qkv.bias": (1152,),
    "blocks.0.attn.proj.weight": (384, 384),
    "blocks.0.ls1.gamma": (384,),
    "blocks.0.mlp.fc1.weight": (1536, 384),
    "blocks.0.mlp.fc2.weight": (384, 1536),
    "blocks.11.ls2.gamma": (384,),
    "norm.weight": (384,),
    "norm.bias": (384,),
}


@pytest.fixture(scope="module")
def dinov2_small(tmp_path_factory):
    m = build_backbone("dinov2_vits14", pretrained=False, image_size=56)
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14.pth"
    torch.save(m.state_dict(), path)
    return m, path


def test_dinov2_official_layout(dinov2_small):
    m, _ = dinov2_small
    shapes = _shapes(m.state_dict())
    for k, s in DINOV2_VITS14_OFFICIAL.items():
        assert shapes[k] == s, k
    assert len(shapes) == 175  # 12 blocks x 14 + patch_embed 2 + cls/pos/mask + norm 2
    assert "register_tokens" not in shapes and not any(k.startswith("head") for k in shapes)
    assert (m.name, m.dim, m.weights_id) == ("dinov2_vits14", 384, "random")
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert m.preprocess.size == 56 and m.preprocess.resize == "squash"


def test_dinov2_local_weights_roundtrip(dinov2_small):
    m, path = dinov2_small
    m2 = build_backbone("dinov2_vits14", weights=str(path), image_size=56)
    x = _x(56)
    with torch.no_grad():
        a, b = m(x), m2(x)
    assert a.shape == (2, 384)
    torch.testing.assert_close(a, b)
    assert m2.weights_id == file_digest(path) and m2.weights_id != "random"


def test_random_weights_are_reproducible(dinov2_small):
    m, _ = dinov2_small
    again = build_backbone("dinov2_vits14", pretrained=False, image_size=56)
    torch.testing.assert_close(m.pos_embed, again.pos_embed)  # "random" names one set of weights


def test_dinov2_cls_plus_mean(dinov2_small):
    m, path = dinov2_small
    e = build_backbone("dinov2_vits14", weights=path, feature="cls+mean", image_size=56)
    assert e.dim == 768 and e.name == "dinov2_vits14+mean" and e.cache_key() != m.cache_key()
    x = _x(56)
    with torch.no_grad():
        out, cls, tok = e(x), m(x), m.tokens(x)
    assert out.shape == (2, 768)
    torch.testing.assert_close(out[:, :384], cls)
    torch.testing.assert_close(out[:, 384:], tok[:, 1:].mean(1))


def test_pos_embed_interpolation_to_224(dinov2_small):
    m, _ = dinov2_small
    with torch.no_grad():
        assert m.tokens(_x(224, n=1)).shape == (1, 1 + 16 * 16, 384)  # 37x37 grid -> 16x16
        assert m.interpolate_pos_embed(37, 37) is m.pos_embed  # native grid: untouched
        assert m.interpolate_pos_embed(4, 6).shape == (1, 1 + 24, 384)


def test_dinov2_strict_loading(dinov2_small, tmp_path):
    m, _ = dinov2_small
    sd = m.state_dict()
    renamed = dict(sd)
    renamed["blocks.0.ls1.scale"] = renamed.pop("blocks.0.ls1.gamma")
    with pytest.raises(WeightsError, match=r"blocks\.0\.ls1\.gamma"):
        build_backbone("dinov2_vits14", weights=_save(tmp_path, renamed, "renamed.pth"))
    missing = {k: v for k, v in sd.items() if k != "mask_token"}
    with pytest.raises(WeightsError, match="missing keys: mask_token"):
        build_backbone("dinov2_vits14", weights=_save(tmp_path, missing, "missing.pth"))
    wrong = dict(sd, **{"norm.weight": torch.ones(10)})
    with pytest.raises(WeightsError, match="wrong shapes"):
        build_backbone("dinov2_vits14", weights=_save(tmp_path, wrong, "shape.pth"))


def test_dinov2_training_checkpoint_layout(dinov2_small, tmp_path):
    """teacher dict with module./backbone. prefixes, heads and FSDP block chunks still loads."""
    m, _ = dinov2_small
    teacher = {}
    for k, v in m.state_dict().items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 3}.{k.split('.', 1)[1]}"  # chunked: blocks.<chunk>.<i>.
        teacher["module.backbone." + k] = v
    teacher["module.dino_head.mlp.0.weight"] = torch.zeros(4, 384)
    path = _save(tmp_path, {"teacher": teacher, "iteration": 7})
    m2 = build_backbone("dinov2_vits14", weights=path, image_size=56)
    with torch.no_grad():
        torch.testing.assert_close(m(_x(56)), m2(_x(56)))


def test_dinov2_registers_and_large_configs():
    from imgclust.backbones.vit import VIT_CONFIGS, vit_model

    for key, (dim, depth, heads) in {
        "dinov2_vitb14": (768, 12, 12),
        "dinov2_vitl14": (1024, 24, 16),
        "dinov2_vitg14": (1536, 40, 24),
        "dino_vitb8": (768, 12, 12),
    }.items():
        c = VIT_CONFIGS[key]
        assert (c.embed_dim, c.depth, c.num_heads) == (dim, depth, heads), key
    g = VIT_CONFIGS["dinov2_vitg14_reg"]
    assert g.swiglu and g.mlp_hidden == 4096 and g.num_registers == 4 and g.interp_antialias and g.interp_offset == 0
    assert VIT_CONFIGS["dinov2_vitg14"].url.endswith("/dinov2_vitg14/dinov2_vitg14_pretrain.pth")
    assert VIT_CONFIGS["dinov2_vits14_reg"].url.endswith("/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth")
    # the big layouts, on the meta device (no memory, no compute)
    with torch.device("meta"):
        big = _shapes(vit_model("dinov2_vitg14_reg").state_dict())
        large = _shapes(vit_model("dinov2_vitl14").state_dict())
    assert big["blocks.39.mlp.w12.weight"] == (8192, 1536) and big["blocks.39.mlp.w3.weight"] == (1536, 4096)
    assert big["register_tokens"] == (1, 4, 1536) and big["pos_embed"] == (1, 1370, 1536)
    assert "blocks.0.mlp.fc1.weight" not in big and len(big) == 568
    assert large["pos_embed"] == (1, 1370, 1024) and len(large) == 343


def test_dinov2_registers_forward():
    m = build_backbone("dinov2_vits14_reg", pretrained=False, image_size=28)
    assert _shapes(m.state_dict())["register_tokens"] == (1, 4, 384)
    with torch.no_grad():
        assert m.tokens(_x(28, n=1)).shape == (1, 1 + 4 + 4, 384)
        m2 = build_backbone("dinov2_vits14_reg", pretrained=False, image_size=28, feature="cls+mean")
        tok = m.tokens(_x(28))
        torch.testing.assert_close(m2(_x(28))[:, 384:], tok[:, 5:].mean(1))  # registers excluded


# ------------------------------------------------------------------------------------ DINO ViT


def test_dino_vits16_layout_roundtrip_and_teacher(tmp_path):
    m = build_backbone("dino_vits16", pretrained=False, image_size=32)
    shapes = _shapes(m.state_dict())
    assert shapes["pos_embed"] == (1, 197, 384)  # 224 / 16 = 14x14 + CLS
    assert shapes["patch_embed.proj.weight"] == (384, 3, 16, 16)
    assert shapes["blocks.11.attn.qkv.bias"] == (1152,)
    assert "mask_token" not in shapes and not any(".ls1." in k for k in shapes)
    assert len(shapes) == 150  # 12 blocks x 12 + patch_embed 2 + cls/pos + norm 2
    sd = m.state_dict()
    teacher = {"backbone." + k: v for k, v in sd.items()} | {"head.mlp.0.weight": torch.zeros(2, 2)}
    path = _save(tmp_path, {"teacher": teacher})
    m2 = build_backbone("dino_vits16", weights=path, image_size=32)
    with torch.no_grad():
        torch.testing.assert_close(m(_x(32)), m2(_x(32)))
        assert m.interpolate_pos_embed(14, 14) is m.pos_embed  # 224 input uses the stored grid
    from imgclust.backbones.vit import VIT_CONFIGS

    assert VIT_CONFIGS["dino_vits8"].grid == 28  # pos_embed (1, 785, 384)
    assert VIT_CONFIGS["dino_vitb16"].url == (
        "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"
    )


def test_vit_bad_options():
    with pytest.raises(InputError, match="multiple of the patch size"):
        build_backbone("dinov2_vits14", pretrained=False, image_size=50)
    with pytest.raises(InputError, match="feature"):
        build_backbone("dinov2_vits14", pretrained=False, feature="avg")
    with pytest.raises(InputError, match="does not take option"):
        build_backbone("dinov2_vits14", pretrained=False, colour="blue")


# ------------------------------------------------------------------------------------------ CLIP

CLIP_B32_OFFICIAL = {
    "visual.conv1.weight": (768, 3, 32, 32),
    "visual.class_embedding": (768,),
    "visual.positional_embedding": (50, 768),
    "visual.ln_pre.weight": (768,),
    "visual.transformer.resblocks.0.ln_1.weight": (768,),
    "visual.transformer.resblocks.0.attn.in_proj_weight": (2304, 768),
    "visual.transformer.resblocks.0.attn.in_proj_bias": (2304,),
    "visual.transformer.resblocks.0.attn.out_proj.weight": (768, 768),
    "visual.transformer.resblocks.11.mlp.c_fc.weight": (3072, 768),
    "visual.transformer.resblocks.11.mlp.c_proj.weight": (768, 3072),
    "visual.ln_post.bias": (768,),
    "visual.proj": (768, 512),
}


def test_clip_vitb32_layout_full_dict_and_strictness(tmp_path):
    m = build_backbone("clip_vitb32", pretrained=False, image_size=64)
    sd = m.state_dict()
    shapes = _shapes(sd)
    for k, s in CLIP_B32_OFFICIAL.items():
        assert shapes[k] == s, k
    assert len(shapes) == 152 and "visual.conv1.bias" not in shapes
    assert (m.name, m.dim) == ("clip_vitb32", 512)
    pre = m.preprocess
    assert (pre.size, pre.resize, pre.crop_pct, pre.interpolation) == (64, "center_crop", 1.0, "bicubic")
    assert pre.mean == (0.48145466, 0.4578275, 0.40821073)
    # a full CLIP state dict in fp16 (as OpenAI ships it): the text tower is ignored
    full = {k: v.half() for k, v in sd.items()}
    full.update({"logit_scale": torch.tensor(4.6), "token_embedding.weight": torch.zeros(8, 4),
                 "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(12, 4)})  # fmt: skip
    path = _save(tmp_path, full)
    m2 = build_backbone("clip_vitb32", weights=path, image_size=64)
    with torch.no_grad():
        out = m2(_x(64))
        ref = m.visual.ln_post(m.visual.transformer.resblocks(m.visual.ln_pre(
            torch.cat([m.visual.class_embedding.expand(2, 1, -1),
                       m.visual.conv1(_x(64)).flatten(2).transpose(1, 2)], 1)
            + m.visual._pos(2, 2)))[:, 0]) @ m.visual.proj  # fmt: skip
    assert out.shape == (2, 512)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)  # fp16 round trip of the weights
    assert m2.weights_id == file_digest(path)
    del full["visual.proj"]
    with pytest.raises(WeightsError, match=r"missing keys: visual\.proj"):
        build_backbone("clip_vitb32", weights=_save(tmp_path, full, "missing.pth"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_clip_refuses_torchscript(tmp_path):
    class Tiny(torch.nn.Module):
        def forward(self, x):
            return x + 1

    path = tmp_path / "ViT-B-32.pt"
    torch.jit.save(torch.jit.script(Tiny()), str(path))
    with pytest.raises(WeightsError, match="TorchScript.*state_dict"):
        build_backbone("clip_vitb32", weights=path)


def test_clip_download_needs_open_clip():
    if importlib.util.find_spec("open_clip") is not None:
        pytest.skip("open_clip is installed here")
    with pytest.raises(WeightsError, match="open_clip"):
        build_backbone("clip_vitb16")


def test_clip_configs():
    from imgclust.backbones.clip import CLIP_CONFIGS

    c = CLIP_CONFIGS["clip_vitl14"]
    assert (c.width, c.layers, c.heads, c.patch_size, c.output_dim) == (1024, 24, 16, 14, 768)
    assert CLIP_CONFIGS["clip_vitl14_336"].resolution == 336
    assert CLIP_CONFIGS["clip_vitb16"].url.endswith("/ViT-B-16.pt")


# ---------------------------------------------------------------------------------------- ResNet

RESNET50_OFFICIAL = {
    "conv1.weight": (64, 3, 7, 7),
    "bn1.running_mean": (64,),
    "layer1.0.conv1.weight": (64, 64, 1, 1),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer1.0.downsample.1.running_var": (256,),
    "layer2.0.conv2.weight": (128, 128, 3, 3),
    "layer3.5.bn3.weight": (1024,),
    "layer4.2.conv3.weight": (2048, 512, 1, 1),
    "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
}


@pytest.fixture(scope="module")
def resnet50():
    return build_backbone("resnet50", pretrained=False, image_size=32)


def test_resnet50_official_layout(resnet50):
    shapes = _shapes(resnet50.state_dict())
    for k, s in RESNET50_OFFICIAL.items():
        assert shapes[k] == s, k
    assert len(shapes) == 318  # torchvision's 320 minus fc.weight / fc.bias
    assert not any(k.startswith("fc.") for k in shapes)
    assert (resnet50.name, resnet50.dim) == ("resnet50", 2048)
    # torchvision's published num_params (25,557,032) minus fc (2048 x 1000 + 1000)
    assert sum(p.numel() for p in resnet50.parameters()) == 25_557_032 - 2_049_000


def test_resnet18_roundtrip_and_strict(tmp_path):
    m = build_backbone("resnet18", pretrained=False, image_size=32)
    sd = m.state_dict()
    shapes = _shapes(sd)
    assert len(shapes) == 120 and shapes["layer4.1.conv2.weight"] == (512, 512, 3, 3)
    assert shapes["layer2.0.downsample.0.weight"] == (128, 64, 1, 1) and "layer1.0.downsample.0.weight" not in shapes
    # a torchvision checkpoint still has its classifier, and older ones lack num_batches_tracked
    tv = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    tv.update({"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    m2 = build_backbone("resnet18", weights=_save(tmp_path, tv), image_size=32)
    with torch.no_grad():
        out = m2(_x(32))
        torch.testing.assert_close(m(_x(32)), out)
    assert out.shape == (2, 512)
    bad = dict(sd)
    bad["layer1.0.conv_1.weight"] = bad.pop("layer1.0.conv1.weight")
    with pytest.raises(WeightsError, match=r"layer1\.0\.conv1\.weight"):
        build_backbone("resnet18", weights=_save(tmp_path, bad, "bad.pth"))


def test_mocov2_checkpoint_loads(resnet50, tmp_path):
    sd = resnet50.state_dict()
    ck = {"module.encoder_q." + k: v for k, v in sd.items()}
    ck.update({
        "module.encoder_q.fc.0.weight": torch.zeros(2048, 2048), "module.encoder_q.fc.0.bias": torch.zeros(2048),
        "module.encoder_q.fc.2.weight": torch.zeros(128, 2048), "module.encoder_q.fc.2.bias": torch.zeros(128),
        "module.encoder_k.conv1.weight": torch.zeros(64, 3, 7, 7), "module.queue": torch.zeros(128, 16),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long),
    })  # fmt: skip
    path = _save(tmp_path, {"epoch": 800, "arch": "resnet50", "state_dict": ck}, "moco_v2_800ep_pretrain.pth.tar")
    m = build_backbone("mocov2_resnet50", weights=path, image_size=32)
    assert m.name == "mocov2_resnet50" and m.dim == 2048
    with torch.no_grad():
        torch.testing.assert_close(m(_x(32)), resnet50(_x(32)))


def test_small_images_variant():
    from imgclust.backbones.resnet import build_resnet

    net = build_resnet(18, small_images=True)
    assert net.training and all(p.requires_grad for p in net.parameters())  # trainable, for pre-training
    assert tuple(net.conv1.weight.shape) == (64, 3, 3, 3) and net.dim == 512
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert build_resnet(34).dim == 512
    m = build_backbone("resnet18", pretrained=False, small_images=True)
    assert m.preprocess.size == 32 and m.name == "resnet18-small"
    with pytest.raises(InputError, match="small_images"):
        build_backbone("resnet50", small_images=True)


def test_download_path_uses_official_url(monkeypatch, resnet50):
    calls = []
    sd = dict(resnet50.state_dict(), **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})

    def fake(url, **kw):
        calls.append((url, kw))
        return sd

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake)
    m = build_backbone("resnet50", image_size=32)
    url = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    assert calls[0][0] == url and calls[0][1]["weights_only"] is True
    assert m.weights_id == url

    def offline(url, **kw):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match="dinov2_vits14_pretrain.pth.*--weights PATH"):
        build_backbone("dinov2_vits14")


# ------------------------------------------------------------------------------ safety and timm


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": _Evil(marker)}, path)
    with pytest.raises(WeightsError):
        build_backbone("resnet18", weights=path)
    with pytest.raises(WeightsError):
        build_backbone("dino_vits16", weights=path)
    assert not marker.exists()
    # and a raw pickle of the same object, not a torch file
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(WeightsError):
        build_backbone("clip_vitb32", weights=raw)
    assert not marker.exists()


def test_timm_entry_is_listed_and_explains_missing_timm():
    assert "timm" in {i.name for i in available_backbones()}
    if importlib.util.find_spec("timm") is not None:
        try:
            import timm  # noqa: F401
        except Exception:
            pass
        else:
            pytest.skip("timm imports here")
    with pytest.raises(ImgclustError) as e:
        build_backbone("timm:resnet50.a1_in1k")
    msg = str(e.value)
    assert "timm:resnet50.a1_in1k" in msg and "pip install 'imgclust[timm]'" in msg and "torchvision" in msg
    assert "\n" not in msg
