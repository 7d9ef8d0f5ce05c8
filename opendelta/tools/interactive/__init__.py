"""Choose the modules to modify in a web page: ``LoraModel(model, interactive_modify=True)``.

:func:`interactive` serves the folded module tree on a local page and blocks until the
page submits a selection. On the page: click a name to select or deselect it (a folded or
merged node stands for all its modules), ``[+]``/``[-]`` expand and collapse, double-click
``[*]`` to unfold a repeated block (``0-11``) or merged siblings (``query,key,value``)
into single modules, and *Submit*.
"""
from __future__ import annotations

from typing import List, Optional

from torch import nn

from .server import SelectionServer, exact_keys, selectable_names

__all__ = ["interactive", "SelectionServer", "exact_keys"]


def interactive(backbone_model: nn.Module, port: Optional[int] = None, host: str = "127.0.0.1",
                timeout: Optional[float] = None, title: str = "root") -> List[str]:
    """Serve a page for picking modules of ``backbone_model``; return the picked ones.

    Args:
        backbone_model: the model whose modules are shown (delta layers left out).
        port: TCP port; ``None`` or ``0`` picks a free one. The URL is printed.
        host: address to bind; the default serves this machine only (use SSH port
            forwarding to reach it from elsewhere).
        timeout: seconds to wait for a submission; ``None`` waits for ever.
        title: label of the root node.

    Returns:
        ``modified_modules`` keys naming exactly the selected modules, one key per module:
        the full module name, or an anchored ``[r]^...`` pattern where the full name is
        also the tail of another module's name (plain keys match by suffix).

    Raises:
        OSError: the port is taken. TimeoutError: nothing submitted within ``timeout``.
    """
    if not isinstance(backbone_model, nn.Module):
        raise TypeError(f"backbone_model must be a torch.nn.Module, got {type(backbone_model).__name__}")
    if port is not None and not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be between 0 and 65535 (0 or None: any free port), got {port}")
    server = SelectionServer(backbone_model, host=host, port=int(port or 0), title=title)
    server.start()
    print(f"Select the modules to modify at {server.url} (open it in a browser; from another "
          f"machine forward the port: ssh -L {server.port}:localhost:{server.port} <this host>)",
          flush=True)
    names = server.wait(timeout)
    order = {name: i for i, (name, _) in enumerate(backbone_model.named_modules(remove_duplicate=False))}
    names.sort(key=lambda n: order.get(n, len(order)))
    keys = exact_keys(names, selectable_names(backbone_model))
    print(f"modified_modules: {keys}", flush=True)
    return keys
