"""Write `model_cards/<name>.md`, one model card per released EVL checkpoint (the converter's output)."""

from pathlib import Path

from evl_hf.configuration_evl import EVL_PRESETS


# The authors' README re-runs (Kinetics-400 validation), see docs: backbone, frames x stride, views, top-1 / top-5.
RELEASED = {
    "k400-vit-b16-8f": ("k400_vitb16_8f_dec4x768.pth", 82.8, 95.8),
    "k400-vit-b16-16f": ("k400_vitb16_16f_dec4x768.pth", 83.7, 96.2),
    "k400-vit-b16-32f": ("k400_vitb16_32f_dec4x768.pth", 84.3, 96.6),
    "k400-vit-l14-8f": ("k400_vitl14_8f_dec4x1024.pth", 86.3, 97.2),
    "k400-vit-l14-16f": ("k400_vitl14_16f_dec4x1024.pth", 86.9, 97.4),
    "k400-vit-l14-32f": ("k400_vitl14_32f_dec4x1024.pth", 87.7, 97.6),
}

TEMPLATE = """---
library_name: transformers
pipeline_tag: video-classification
base_model: {backbone}
datasets:
- kinetics400
license: apache-2.0
tags:
- evl
- video-classification
- frozen-clip
model-index:
- name: evl-{name}
  results:
  - task:
      type: video-classification
    dataset:
      name: Kinetics-400
      type: kinetics400
      split: validation
    metrics:
    - type: top-1 accuracy
      value: {top1}
      name: Top-1 (reported by the EVL authors)
    - type: top-5 accuracy
      value: {top5}
      name: Top-5 (reported by the EVL authors)
---

# EVL {title} on Kinetics-400

EVL ("Frozen CLIP Models are Efficient Video Learners", Lin et al., ECCV 2022) classifies videos with a **frozen**
CLIP image encoder ([`{backbone}`](https://huggingface.co/{backbone})) run on every frame, and a light
Transformer decoder with one learned query that reads the features of the backbone's last 4 blocks, with temporal
convolution, temporal position embeddings and cross-frame attention. This checkpoint is the authors' released
`{file}` converted to a native `transformers` model with evl-hf.

| | |
| --- | --- |
| backbone | {backbone} (frozen, {size}x{size}) |
| frames x stride | {frames} x {stride} |
| decoder | 4 layers, qkv width {qkv}, {heads} heads |
| classes | 400 (Kinetics-400, `id2label` holds the class names) |
| evaluation views | {spatial} spatial x {temporal} temporal |

## Results

Kinetics-400 validation, **as reported by the EVL authors** (their README re-runs, {spatial}x{temporal} views):
top-1 **{top1}**, top-5 **{top5}**. These figures were not re-measured for this conversion; the conversion itself is
checked for numerical parity (logits within 1e-4) with the authors' implementation.

## Evaluation protocol

Decode (torchcodec or PyAV: the same frames), take {frames} frames {stride} decoded frames apart (a {window}-frame window; a shorter clip repeats its last
frame), resize the short side to {size}, normalise with the OpenAI CLIP mean/std; {views_text}; average the softmax
scores of the views. `EVLVideoProcessor` does all of this, and `EVLForVideoClassification` averages views when given a
`(batch, views, frames, 3, H, W)` input:

```python
import evl_hf  # registers EVL with the Auto classes
from transformers import pipeline

classifier = pipeline("video-classification", model="evl-{name}")
classifier("video.mp4", top_k=5)
```

## Intended use and limitations

Human action recognition on short clips of the 400 Kinetics classes, or a starting point for fine-tuning on other
video classification tasks (the backbone stays frozen, so fine-tuning is cheap). Kinetics is YouTube-sourced and
its class set and demographics are not representative of all video; accuracy on other domains (egocentric,
surveillance, medical, fine-grained motion such as Something-Something) is not established, and the model inherits
the biases of CLIP's web-scale pretraining. Do not use it for decisions about people.

## Conversion

```bash
python -m evl_hf.convert --checkpoint {file} --backbone {backbone} \\
    --labels kinetics400_labels.json --num_spatial_views {spatial} --num_temporal_views {temporal} \\
    --output_dir evl-{name}
```

## Citation

```bibtex
@inproceedings{{lin2022frozen,
  title     = {{Frozen CLIP Models are Efficient Video Learners}},
  author    = {{Lin, Ziyi and Geng, Shijie and Zhang, Renrui and Gao, Peng and de Melo, Gerard and Wang, Xiaogang and Dai, Jifeng and Qiao, Yu and Li, Hongsheng}},
  booktitle = {{ECCV}},
  year      = {{2022}}
}}
```
"""


def main(out: Path = Path(__file__).resolve().parent.parent / "model_cards") -> None:
    out.mkdir(exist_ok=True)
    for name, (file, top1, top5) in RELEASED.items():
        preset = EVL_PRESETS[name]
        backbone = preset["backbone"]
        size = 336 if backbone.endswith("336") else 224
        spatial, temporal = preset["num_spatial_views"], preset["num_temporal_views"]
        views_text = (
            "one centre crop of each of 3 windows spread evenly over the video"
            if temporal == 3
            else "3 crops along the long side of one centred window"
        )
        title = f"{'ViT-B/16' if 'b16' in name else 'ViT-L/14'}, {preset['num_frames']} frames"
        (out / f"evl-{name}.md").write_text(
            TEMPLATE.format(
                name=name, title=title, backbone=backbone, file=file, top1=top1, top5=top5, size=size,
                frames=preset["num_frames"], stride=preset["sampling_rate"], qkv=preset["decoder_qkv_dim"],
                heads=preset["decoder_num_heads"], spatial=spatial, temporal=temporal, views_text=views_text,
                window=(preset["num_frames"] - 1) * preset["sampling_rate"] + 1,
            )  # fmt: skip
        )


if __name__ == "__main__":
    main()
