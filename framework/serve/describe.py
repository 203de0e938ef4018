"""What the service reports about a loaded pipeline (``GET /v1/model/info``): ``Pipeline.info()`` plus its
quantization, each plugin's options and the registered plugins, as plain JSON values."""
from __future__ import annotations

import dataclasses
import json


def describe(pipe) -> dict:
    info = dict(pipe.info())
    quant = [impl.plugin_name for impl in pipe.pm.hook.quantize_layer.get_hookimpls()]
    info["quantization"] = {"plugins": quant, "quantized_layers": info.get("quantized_layers", 0)} \
        if quant else None
    opts = {}
    for name, plugin in pipe.plugins.items():
        o = getattr(plugin, "options", None)
        opts[name] = dataclasses.asdict(o) if dataclasses.is_dataclass(o) else (None if o is None else repr(o))
    info["plugins"] = opts
    info["registered_plugins"] = sorted(n for n, _ in pipe.pm.list_name_plugin()
                                        if not n.startswith("tokenmill-serve-"))
    return json.loads(json.dumps(info, default=str))  # plain JSON values (paths, dtypes become strings)
