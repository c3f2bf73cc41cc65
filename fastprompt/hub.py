"""Can the weights of an open_clip tag be had? A check in seconds, before anything is built.

open_clip fetches a tag's weights on first use, from the Hugging Face hub (`hf_hub` in its
pretrained config; cached under `huggingface_hub.constants.HF_HUB_CACHE`) or from a URL (cached
in `~/.cache/clip`). Without a network the hub client retries with back-off for about a minute,
logs dozens of lines and ends in a long error. `check_download` looks in those caches first; only
when something is missing does it ask the server once (`probe`: one HEAD request, no retries,
PROBE_TIMEOUT_S at most) and, if no answer comes, raises one BackboneError line saying what is
missing, where open_clip looks and how to pass a local file. A server that answers, even with an
HTTP error, means the network works: open_clip then downloads and reports on its own.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import BackboneError, first_line, setting

#: seconds to wait for the server's answer to the one probe
PROBE_TIMEOUT_S = 5.0
#: open_clip's cache of URL downloads (`open_clip.pretrained.download_pretrained_from_url`)
URL_CACHE = "~/.cache/clip"


@dataclass
class Remote:
    """One file open_clip will fetch: from a hub repo (any of `files`) or from `url`."""

    repo: str = ""
    files: tuple = ()
    url: str = ""

    def cached(self) -> bool:
        if self.url:
            return os.path.isfile(self.where())
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(self.repo, f), str) for f in self.files)

    def where(self) -> str:
        """The local file or folder open_clip looks in."""
        if self.url:
            return os.path.join(os.path.expanduser(URL_CACHE), os.path.basename(self.url))
        from huggingface_hub import constants

        return os.path.join(constants.HF_HUB_CACHE, "models--" + self.repo.replace("/", "--"))

    def unreachable(self) -> str | None:
        """Why the file cannot be downloaded now, or None when its server answers."""
        if self.url:
            return probe(self.url)
        from huggingface_hub import constants, hf_hub_url

        if constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE is set"
        return probe(hf_hub_url(self.repo, self.files[-1]))


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """One HEAD request to `url` (through the proxies of the environment, no retries): None when
    the server answers, even with an HTTP or TLS error (the network works: the download then
    reports on its own), else the reason. Not huggingface_hub's client: its first request also
    fetches a registry of its own, with its own wait."""
    import ssl
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, ssl.SSLError):
            return None
        host = urllib.request.urlparse(url).netloc
        return f"{host}: {first_line(reason) if isinstance(reason, BaseException) else reason}"
    return None


def _hub_files(filename: str) -> tuple:
    """A weights file of a hub repo and the safetensors file open_clip tries before it."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if filename == HF_WEIGHTS_NAME:
        return HF_SAFE_WEIGHTS_NAME, filename
    if filename.endswith((".bin", ".pth")):
        return filename[:-4] + ".safetensors", filename
    return (filename,)


def remotes(open_clip, name: str, pretrained: str | None) -> list[Remote]:
    """The files open_clip downloads to build `name` with `pretrained` (a tag; files are local)."""
    from open_clip.constants import HF_CONFIG_NAME, HF_WEIGHTS_NAME

    if name.startswith("hf-hub:"):
        repo = name[len("hf-hub:"):]
        return [Remote(repo=repo, files=(HF_CONFIG_NAME,)),
                Remote(repo=repo, files=_hub_files(HF_WEIGHTS_NAME))]
    if pretrained is None or os.path.exists(pretrained):
        return []
    cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
    if "file" in cfg:
        return []
    hub = cfg.get("hf_hub", "")
    if hub and open_clip.pretrained.has_hf_hub():
        repo, filename = os.path.split(hub)
        return [Remote(repo=repo, files=_hub_files(filename or HF_WEIGHTS_NAME))]
    return [Remote(url=cfg["url"])] if cfg.get("url") else []


def check_download(open_clip, name: str, pretrained: str | None) -> None:
    """Return at once when open_clip can build `name` with `pretrained` without downloading or
    its server answers; else BackboneError (one line: what is missing, where open_clip looks,
    how to pass a local file)."""
    for remote in remotes(open_clip, name, pretrained):
        if remote.cached():
            continue
        why = remote.unreachable()
        if why is None:
            continue
        what = f"the files of {name}" if name.startswith("hf-hub:") else \
            f"the '{pretrained}' weights of {name}"
        files = " or ".join(remote.files) if remote.files else os.path.basename(remote.url)
        local = (f"give an open_clip name such as ViT-B-16 with a local checkpoint file, "
                 if name.startswith("hf-hub:") else "pass a local checkpoint file as ")
        raise BackboneError(
            f"{what} are not in the local cache and cannot be downloaded ({why}): open_clip looks "
            f"for {files} in {remote.where()}; connect once to download them, or {local}"
            f"{setting('--pretrained', 'FILE')}")
