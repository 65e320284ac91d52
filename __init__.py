"""ComfyUI entry point of the VARE node pack (V3 API: `comfy_entrypoint`).

ComfyUI imports this folder as a package from custom_nodes/. The pack's library, vare_core, sits
beside this file and never imports ComfyUI; it is made importable by name here. The web
extension (web/vare.js) is served from WEB_DIRECTORY; example workflows live in workflows/.
"""
import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.insert(0, _PACK_DIR)          # `import vare_core` from the nodes

from .nodes import NODES  # noqa: E402
from .nodes.compat import ComfyExtension  # noqa: E402
from .nodes.host import register_folders  # noqa: E402

WEB_DIRECTORY = "./web"


class VareExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)


async def comfy_entrypoint() -> VareExtension:
    register_folders()
    return VareExtension()
