"""PromptSRC: IVLP's deep prompts, regularised toward the frozen CLIP, averaged over epochs (GPA).

Slots: IVLP's (maple.py) with n_ctx 4 in each tower and depth 9 (cross-dataset: 3); at inference
PromptSRC *is* IVLP. The released objective (muzairkhattak/PromptSRC `trainers/promptsrc.py`,
`PromptSRC.forward_backward`), B images, C classes, s = logit_scale.exp():

    L = CE(z, y) + ( KL_sum(softmax z0 || softmax z) / (B*C)
                     + 25 * mean|t - t0| + 10 * mean|v - v0| )              (this summation order)

t, v: the normalised prompted text / image features, z = s v t^T. t0 = normalise(mean over the 60
templates `TEACHER_TEMPLATES` of the *un-normalised* frozen text features), once per class list;
v0: the frozen image features of the same augmented batch — the released code keeps a second,
prompt-free copy of the image tower (`ZS_image_encoder`), here the same backbone with the slots
off gives the same numbers without the copy; z0 = s v0 t0^T. The KL is
`kl_div(log_softmax z, log_softmax z0, reduction="sum", log_target=True) / z.numel()`: divided by
B*C, not by B (paper eq. 6 writes a batch mean).

GPA (Gaussian prompt aggregation, paper eq. 8): w_e = N(e; mu, sigma) over epochs e = 1..E,
normalised; after the last step of epoch e the running sum S += w_e * theta_e of the learnable
tensors (the code: the whole state dict, frozen towers included — noise only), and after training
the model becomes S. Base-to-novel mu 15 sigma 1, cross-dataset 6 / 10, few-shot 30 / 30 or 45 / 5
(the recipes set them: `gpa_mean`, `gpa_std`). S is training state: a resumed run continues it.

Original checkpoints: `VLPromptLearner/model.pth.tar-N`, the whole model; IVLP's key names plus the
frozen `prompt_learner.ZS_image_encoder.*`, which is how a PromptSRC file is told from an IVLP one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..backbone import NO_HOOKS
from ..original.keys import Layout, first_key
from .base import register
from .coop import LEARNER_BUFFERS
from .maple import IVLP, WHOLE_MODEL_CLIP, IVLPConfig, ivlp_names, ivlp_options

#: description and recipes (methods.base.card; read by fastprompt.catalog without torch). Few-shot:
#: the yaml's GPA 30 / 30 (ImageNet, Caltech, Pets, Food, UCF, SUN) and, as its comment says,
#: 45 / 5 for Cars, Flowers, Aircraft, DTD and EuroSAT
CARDS = {
    "promptsrc": {
        "about": "IVLP's prompts held near frozen CLIP's features and logits, Gaussian-averaged "
                 "over epochs (PromptSRC)",
        "recipes": {
            "base2novel": {"batch_size": 4, "lr": 0.0025, "epochs": 20,
                           "options": {"gpa_mean": 15.0, "gpa_std": 1.0},
                           "source": "PromptSRC configs/trainers/PromptSRC/"
                                     "vit_b16_c2_ep20_batch4_4+4ctx.yaml"},
            "cross": {"batch_size": 4, "lr": 0.0025, "epochs": 20,
                      "options": {"depth": 3, "gpa_mean": 6.0, "gpa_std": 10.0},
                      "source": "PromptSRC configs/trainers/PromptSRC/"
                                "vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets.yaml"},
            "fewshot": {"batch_size": 4, "lr": 0.0025, "epochs": 50,
                        "options": {"gpa_mean": 30.0, "gpa_std": 30.0},
                        "datasets": {
                            "stanford_cars": {"options": {"gpa_mean": 45.0, "gpa_std": 5.0}},
                            "oxford_flowers": {"options": {"gpa_mean": 45.0, "gpa_std": 5.0}},
                            "fgvc_aircraft": {"options": {"gpa_mean": 45.0, "gpa_std": 5.0}},
                            "dtd": {"options": {"gpa_mean": 45.0, "gpa_std": 5.0}},
                            "eurosat": {"options": {"gpa_mean": 45.0, "gpa_std": 5.0}}},
                        "source": "PromptSRC configs/trainers/PromptSRC/"
                                  "vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml"},
        },
    },
}

#: the text teacher's prompts: the first 60 of CLIP's 80 ImageNet templates, for every dataset
#: (PromptSRC trainers/imagenet_templates.py, IMAGENET_TEMPLATES)
TEACHER_TEMPLATES = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.",
    "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.",
    "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.",
    "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
)


def gpa_weights(mean: float, std: float, epochs: int) -> list[float]:
    """GPA's weight of each epoch 1..`epochs`: the normal density N(e; mean, std) normalised to
    sum 1, in float64 and in the order the released code evaluates it (one density per epoch,
    then a sequential sum). Where every density underflows (std tiny against mean - epochs) the
    code divides 0 by 0; here the same weights come from the log densities."""
    def density(e):
        return (1 / (std * np.sqrt(2 * np.pi))) * np.exp(-0.5 * ((e - mean) / std) ** 2)
    g = np.array([density(e) for e in range(1, epochs + 1)])
    if not 0 < sum(g) < np.inf:
        log = np.array([-0.5 * ((e - mean) / std) ** 2 for e in range(1, epochs + 1)])
        g = np.exp(log - log.max())
    return [float(w) for w in g / sum(g)]


@dataclass
class PromptSRCConfig(IVLPConfig):
    n_ctx: int = 4
    depth: int = 9                # both towers (cross-dataset / DG: 3)
    text_weight: float = 25.0     # TEXT_LOSS_WEIGHT
    image_weight: float = 10.0    # IMAGE_LOSS_WEIGHT
    gpa: bool = True              # False: keep the last epoch's tensors
    gpa_mean: float = 15.0        # GPA_MEAN (epochs, 1-based)
    gpa_std: float = 1.0          # GPA_STD

    def __post_init__(self):
        from ..errors import InputError

        if not 0 < self.gpa_std < float("inf") or not abs(self.gpa_mean) < float("inf"):
            raise InputError(f"gpa_mean={self.gpa_mean}, gpa_std={self.gpa_std}: GPA's Gaussian over "
                             f"epochs needs a finite mean and a standard deviation > 0")


def _promptsrc_options(layout, sd, cfg, n_classes, notes) -> dict:
    opts = ivlp_options(layout, sd, cfg, n_classes, notes)
    for name, option in (("TEXT_LOSS_WEIGHT", "text_weight"), ("IMAGE_LOSS_WEIGHT", "image_weight"),
                         ("GPA_MEAN", "gpa_mean"), ("GPA_STD", "gpa_std")):
        if cfg.get(name) is not None:
            opts[option] = float(cfg[name])
    return opts


_ZS_TOWER = "prompt_learner.ZS_image_encoder."


@register("promptsrc")
class PromptSRC(IVLP):
    Config = PromptSRCConfig
    original_layout = Layout(
        "PromptSRC", ("PromptSRC",), "VLPromptLearner", "", "PROMPTSRC", ivlp_names, _promptsrc_options,
        known=IVLP.original_layout.known | {"TEXT_LOSS_WEIGHT", "IMAGE_LOSS_WEIGHT", "GPA_MEAN", "GPA_STD"},
        kind="promptsrc", detect=lambda keys: first_key(keys, "^" + _ZS_TOWER.replace(".", r"\.")),
        precedence=15, ignored=LEARNER_BUFFERS, ignored_prefixes=WHOLE_MODEL_CLIP + (_ZS_TOWER,),
        markers=lambda model: {_ZS_TOWER + "class_embedding": model.clip.model.visual.class_embedding})

    def __init__(self, clip, classnames, config):
        super().__init__(clip, classnames, config)
        self._gpa: dict[str, torch.Tensor] = {}  # the running sum S of each learnable tensor
        self._gpa_epochs: int | None = None       # E its weights were normalised over

    # ----------------------------------------------------------------- the objective
    def teacher_text(self) -> torch.Tensor:
        """t0 before normalisation: the mean over the 60 templates of the frozen text features."""
        return self.frozen_text_features(TEACHER_TEMPLATES)

    def teacher_image(self, images: torch.Tensor) -> torch.Tensor:
        """v0 before normalisation: the image tower with the slots off (the released code runs a
        second, prompt-free copy of the tower, `ZS_image_encoder`: the same numbers)."""
        return self.backbone.encode_image(images, NO_HOOKS, self.opts)

    def loss_terms(self, images: torch.Tensor, labels: torch.Tensor):
        """({"ce", "text_l1", "image_l1", "kl"}: the released terms, weights applied; the
        prompted logits z)."""
        cfg = self.config
        image, text = self.image_features(images), self.text_features()
        logits = self.logits_from(image, text)
        with torch.no_grad():  # the frozen model on the same (augmented) batch
            text0 = F.normalize(self.teacher_text(), dim=-1)
            image0 = F.normalize(self.teacher_image(images), dim=-1)
            logits0 = self.logits_from(image0, text0)
        kl = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(logits0, dim=1), reduction="sum",
                      log_target=True) / logits.numel()
        return {"ce": F.cross_entropy(logits, labels),
                "text_l1": F.l1_loss(text, text0) * cfg.text_weight,
                "image_l1": F.l1_loss(image, image0) * cfg.image_weight,
                "kl": kl}, logits

    def loss_and_logits(self, images, labels):
        terms, logits = self.loss_terms(images, labels)
        return terms["ce"] + (terms["kl"] + terms["text_l1"] + terms["image_l1"]), logits

    # ----------------------------------------------------------------- GPA (training hooks)
    def begin_training(self, context) -> None:
        self._gpa, self._gpa_epochs = {}, None
        self.teacher_text()  # once, before the first step (the released code: at build time)

    def end_epoch(self, epoch: int, epochs: int) -> None:
        """S += w_e * theta_e after the last step of 0-indexed `epoch` of `epochs`."""
        if not self.config.gpa:
            return
        if self._gpa_epochs not in (None, epochs):
            from ..errors import TrainingError

            raise TrainingError(f"the GPA average so far weighs epochs 1..{self._gpa_epochs}, this run "
                                f"has {epochs}: resume with --epochs {self._gpa_epochs}, or start a new run")
        self._gpa_epochs = epochs
        w = gpa_weights(self.config.gpa_mean, self.config.gpa_std, epochs)[epoch]
        with torch.no_grad():
            for name, p in self.trainable_state().items():
                term = p.detach() * w
                self._gpa[name] = self._gpa[name] + term if name in self._gpa else term.clone()

    def end_training(self, context) -> None:
        """The model becomes the GPA average (what is evaluated and saved)."""
        if not self._gpa:
            return
        with torch.no_grad():
            for name, p in self.trainable_state().items():
                p.copy_(self._gpa[name])

    def training_state(self) -> dict[str, torch.Tensor]:
        if not self._gpa:
            return {}
        epochs = torch.tensor(float(self._gpa_epochs))
        return {**{f"gpa/{k}": v for k, v in self._gpa.items()}, "gpa/epochs": epochs}

    def load_training_state(self, tensors, path) -> None:
        from ..errors import CheckpointError

        own = self.trainable_state()
        want = ({f"gpa/{k}" for k in own} | {"gpa/epochs"}) if self.config.gpa else set()
        if set(tensors) != want:
            odd = sorted(set(tensors) ^ want)[0]
            raise CheckpointError(f"{path} {'holds' if odd in tensors else 'lacks'} the GPA state "
                                  f"'{odd}' ({self.name}, gpa={self.config.gpa}): a checkpoint of "
                                  f"another method or config; start a new run")
        if not want:
            return
        epochs = float(tensors["gpa/epochs"].reshape(-1)[0]) if tensors["gpa/epochs"].numel() == 1 else -1
        if epochs < 1 or epochs != int(epochs):
            raise CheckpointError(f"{path}: 'train_state/gpa/epochs' is not a count of epochs; "
                                  f"start a new run")
        for name, p in own.items():
            if tensors[f"gpa/{name}"].shape != p.shape:
                raise CheckpointError(f"{path}: GPA state 'gpa/{name}' has shape "
                                      f"{tuple(tensors[f'gpa/{name}'].shape)}, the model's is "
                                      f"{tuple(p.shape)}: another config; start a new run")
        self._gpa = {k: tensors[f"gpa/{k}"].to(p.device, p.dtype) for k, p in own.items()}
        self._gpa_epochs = int(epochs)
