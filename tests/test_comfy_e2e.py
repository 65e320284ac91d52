"""End to end in a real ComfyUI: the pack loads, its nodes, web extension and workflows are served,
workflows 1 and 2 run to completion on CPU, Cancel keeps a partial adapter, and (with Debian's
chromium) the browser shows the nodes and a loss chart that updates during training.

    VARE_COMFYUI_DIR=/tmp/comfyui python -m pytest tests/test_comfy_e2e.py -v -s

VARE_COMFYUI_DIR: a ComfyUI source tree. ComfyUI is not on the package registries; get it with

    git clone https://github.com/Comfy-Org/ComfyUI /tmp/comfyui
    python3 -m venv /tmp/comfyui/.venv
    /tmp/comfyui/.venv/bin/pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu
    /tmp/comfyui/.venv/bin/pip install -r /tmp/comfyui/requirements.txt

(CPU torch first, so that its requirements keep it; a torchaudio that fails to import only costs
ComfyUI its audio nodes). Its Python is $VARE_COMFYUI_PYTHON, else <dir>/.venv/bin/python. The
server runs with a fresh --base-directory (models, custom_nodes, output in a temp folder) and this
pack linked into custom_nodes as a user's would be. VARE_E2E_TRAIN_STEPS overrides the training
steps of workflow 2 (default: as shipped). Without VARE_COMFYUI_DIR every test skips, saying why.

Frontend: by default the server serves the comfyui-frontend-package that ComfyUI's requirements
pin. VARE_COMFYUI_FRONTEND_ROOT=/path/to/static serves another one (passed as --front-end-root),
e.g. the current release, installed beside the pinned one:

    pip install --target /tmp/fe comfyui-frontend-package==1.58.1
    VARE_COMFYUI_FRONTEND_ROOT=/tmp/fe/comfyui_frontend_package/static VARE_COMFYUI_DIR=/tmp/comfyui \
        python -m pytest tests/test_comfy_e2e.py -v -s
"""
import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.parse
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from test_workflows import (FILE_INPUTS, REPO, WORKFLOWS, check_workflow, object_info_of_pack, to_api,
                            widget_slots)

COMFY = os.environ.get("VARE_COMFYUI_DIR")
FRONTEND_ROOT = os.environ.get("VARE_COMFYUI_FRONTEND_ROOT")
PACK = Path(os.environ.get("VARE_E2E_PACK", REPO))
pytestmark = pytest.mark.skipif(not COMFY, reason="VARE_COMFYUI_DIR is not set: no ComfyUI source tree to "
                                "test against (this module's docstring says how to get one)")
WF1 = REPO / "workflows" / "vare_embedded_text_to_image.json"
WF2 = REPO / "workflows" / "vare_embedded_erase_before_after.json"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Server:
    def __init__(self, url: str, base: Path, proc):
        self.url, self.base, self.proc = url, base, proc

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            body = response.read()
        return json.loads(body) if response.headers.get_content_type() == "application/json" else body

    def post(self, path: str, data: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            body = response.read()
        return json.loads(body) if body else None

    def run(self, graph: dict, timeout: float, on_message=None) -> tuple[str, dict, list]:
        """Queue over /prompt with the websocket open; returns (status, history entry, messages)."""
        client = uuid.uuid4().hex
        ws = WebSocket(self.url.replace("http", "ws") + f"/ws?clientId={client}", timeout=timeout)
        prompt_id = self.post("/prompt", {"prompt": graph, "client_id": client})["prompt_id"]
        messages, end, status = [], time.time() + timeout, "timeout"
        while time.time() < end:
            message = ws.receive()
            messages.append(message)
            if on_message is not None:
                on_message(message)
            if not isinstance(message, dict) or message["data"].get("prompt_id") not in (None, prompt_id):
                continue
            if message["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                status = message["type"]
                break
        ws.close()
        for _ in range(120):                # the history entry is written just after the last message
            entry = self.get(f"/history/{prompt_id}").get(prompt_id, {})
            if entry.get("status", {}).get("completed") is not None or status == "timeout":
                break
            time.sleep(0.5)
        return status, entry, messages

    def image(self, entry: dict):
        from io import BytesIO
        from PIL import Image
        query = f"/view?filename={entry['filename']}&subfolder={entry['subfolder']}&type={entry['type']}"
        return Image.open(BytesIO(self.get(query)))

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join((self.base / "comfy.log").read_text(errors="replace").splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comfy_python() -> str:
    return os.environ.get("VARE_COMFYUI_PYTHON") or str(Path(COMFY) / ".venv" / "bin" / "python")


def frontend_root() -> Path:
    """The static folder the server serves: VARE_COMFYUI_FRONTEND_ROOT, else the pinned package's."""
    if FRONTEND_ROOT:
        return Path(FRONTEND_ROOT).resolve()
    where = subprocess.run([comfy_python(), "-c", "import os, comfyui_frontend_package as p; "
                            "print(os.path.join(os.path.dirname(p.__file__), 'static'))"],
                           capture_output=True, text=True, check=True)
    return Path(where.stdout.strip())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy = Path(COMFY)
    python = comfy_python()
    base = tmp_path_factory.mktemp("comfy-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "vare").symlink_to(PACK, target_is_directory=True)
    port = _free_port()
    env = {**os.environ, "VARE_CACHE_DIR": str(base / "cache")}
    frontend = ["--front-end-root", str(Path(FRONTEND_ROOT).resolve())] if FRONTEND_ROOT else []
    with open(base / "comfy.log", "w") as log:
        proc = subprocess.Popen([python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                 "--base-directory", str(base), "--disable-auto-launch", *frontend],
                                cwd=comfy, stdout=log, stderr=subprocess.STDOUT, env=env)
    srv = Server(f"http://127.0.0.1:{port}", base, proc)
    try:
        end = time.time() + 300
        while True:
            try:
                srv.get("/object_info/PreviewImage")
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.time() > end:
                    pytest.fail(f"ComfyUI did not start:\n{srv.log_tail()}")
                time.sleep(0.5)
        print(f"\nComfyUI {comfy} on port {port}, base {base}, frontend {FRONTEND_ROOT or 'as pinned'}",
              flush=True)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def workflow(path: Path, widget_overrides: dict | None = None) -> dict:
    """A workflow file with some widget values replaced: {(node type, widget name): value}."""
    data = json.loads(path.read_text())
    info = object_info_of_pack()
    for node in data["nodes"]:
        for (kind, name), value in (widget_overrides or {}).items():
            if node["type"] == kind:
                index = 0
                for slot, _, _, control in widget_slots(info[kind]):
                    if slot == name:
                        node["widgets_values"][index] = value
                    index += 2 if control else 1
    return data


def node_of(graph: dict, kind: str, nth: int = 0) -> str:
    return [k for k, v in graph.items() if v["class_type"] == kind][nth]


# ----------------------------------------------------------------------------- websocket, devtools

class WebSocket:
    """A minimal client (stdlib only): ComfyUI's /ws messages and Chrome's DevTools protocol."""

    def __init__(self, url: str, timeout: float = 120):
        u = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        path = u.path + (f"?{u.query}" if u.query else "")
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.sock.recv(4096)
        head, self.buffer = data.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(head.decode(errors="replace"))

    def _exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buffer)))
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def send(self, text: str):
        payload, mask = text.encode(), os.urandom(4)
        n = len(payload)
        size = bytes([0x80 | n]) if n < 126 else bytes([0xFE]) + struct.pack(">H", n) if n < 65536 \
            else bytes([0xFF]) + struct.pack(">Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x81]) + size + mask + masked)

    def receive(self):
        """The next message: a dict for JSON text, bytes for a binary frame (preview image)."""
        parts, binary = [], False
        while True:
            b0, b1 = self._exact(2)
            n = b1 & 0x7F
            n = struct.unpack(">H", self._exact(2))[0] if n == 126 else \
                struct.unpack(">Q", self._exact(8))[0] if n == 127 else n
            data, opcode = self._exact(n), b0 & 0x0F
            if opcode == 8:
                raise ConnectionError("websocket closed by the server")
            if opcode in (9, 10):
                continue
            binary = binary or opcode == 2
            parts.append(data)
            if b0 & 0x80:
                return b"".join(parts) if binary else json.loads(b"".join(parts))

    def close(self):
        self.sock.close()


class DevTools(WebSocket):
    def __init__(self, url: str):
        super().__init__(url, timeout=600)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = self.receive()
            if isinstance(message, dict) and message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(json.dumps(result["exceptionDetails"])[:2000])
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60, interval: float = 0.25):
        end = time.time() + timeout
        while time.time() < end:
            if self.js(expression):
                return
            time.sleep(interval)
        raise TimeoutError(f"the page never got to {expression}")

    def screenshot(self, path: str):
        Path(path).write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))


def launch_chromium(binary: str, size=(1600, 1000)):
    port = _free_port()
    profile = tempfile.mkdtemp(prefix="vare-chromium-")
    proc = subprocess.Popen([binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
                             f"--window-size={size[0]},{size[1]}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.time() + 60
    while time.time() < end:
        try:
            pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2).read())
            return proc, DevTools(next(p for p in pages if p.get("type") == "page")["webSocketDebuggerUrl"])
        except (OSError, StopIteration, ValueError):
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("chromium did not start")


# ----------------------------------------------------------------------------- registration

def test_object_info_lists_every_node_as_the_standin_describes_it(object_info, server):
    ours = object_info_of_pack()
    names = sorted(k for k in ours if k.startswith("VARE_"))
    assert sorted(k for k in object_info if k.startswith("VARE_")) == names, server.log_tail()
    for name in names:
        real, standin = object_info[name], ours[name]
        assert real["output"] == standin["output"], name
        for group in ("required", "optional"):
            got, want = real["input"].get(group, {}), standin["input"].get(group, {})
            assert list(got) == list(want), (name, group)
            for key, (kind, options) in want.items():
                real_kind, real_options = got[key][0], got[key][1]
                assert real_kind == kind, (name, key)
                for field in ("default", "min", "max", "tooltip", "control_after_generate", "options"):
                    if (name, key) in FILE_INPUTS and field == "options":
                        continue
                    assert real_options.get(field) == options.get(field), (name, key, field)


def test_the_chosen_frontend_is_served(server):
    """The page is the index.html of VARE_COMFYUI_FRONTEND_ROOT (else of the pinned package), and
    the scripts it names are served with it."""
    page = server.get("/")
    assert page == (frontend_root() / "index.html").read_bytes()
    scripts = re.findall(r'<script[^>]+src="([^"]+)"', page.decode())
    assert scripts
    for src in scripts:
        assert len(server.get("/" + src.lstrip("./"))) > 1000, src


def test_web_extension_and_workflow_templates_are_served(server):
    assert "/extensions/vare/vare.js" in server.get("/extensions")
    script = server.get("/extensions/vare/vare.js").decode()
    assert 'addEventListener("vare.train"' in script
    templates = server.get("/workflow_templates")
    assert sorted(templates["vare"]) == sorted(p.stem for p in WORKFLOWS)
    for path in WORKFLOWS:                          # what the template browser fetches for its cards
        assert server.get(f"/api/workflow_templates/vare/{path.stem}.jpg")[:3] == b"\xff\xd8\xff"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_file_checks_against_the_live_server(path, object_info):
    assert check_workflow(json.loads(path.read_text()), object_info) == []


def test_bad_input_is_refused_with_the_node_message(server, object_info):
    graph = to_api(workflow(WF1, {("VARE_Sampler", "cfg"): "3,x"}), object_info)
    with pytest.raises(urllib.error.HTTPError) as refused:
        server.post("/prompt", {"prompt": graph})
    body = json.loads(refused.value.read())
    errors = body["node_errors"][node_of(graph, "VARE_Sampler")]["errors"]
    assert errors[0]["type"] == "custom_validation_failed" and "'x' is not a number" in errors[0]["details"]


def test_a_graph_without_a_required_input_gets_comfyuis_own_message(server, object_info):
    graph = to_api(workflow(WF1), object_info)
    sampler, encode = node_of(graph, "VARE_Sampler"), node_of(graph, "VARE_TextEncode")
    del graph[sampler]["inputs"]["cfg"], graph[sampler]["inputs"]["resolution"], graph[encode]["inputs"]["prompt"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        server.post("/prompt", {"prompt": graph})
    errors = json.loads(refused.value.read())["node_errors"]
    for node, missing in ((sampler, {"cfg", "resolution"}), (encode, {"prompt"})):
        assert {e["type"] for e in errors[node]["errors"]} == {"required_input_missing"}, errors[node]
        assert {e["details"] for e in errors[node]["errors"]} == missing
    assert "TypeError" not in server.log_tail(200)


# ----------------------------------------------------------------------------- memory of one request

def server_rss(server) -> int:
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024


def many_lines_graph(lines: int, negative: str) -> dict:
    words = ["a red circle on a white background", "a blue square", "a purple triangle", "a green cross"]
    return {"1": {"class_type": "VARE_LoadModel", "inputs": {"transformer": "embedded", "vae": "embedded",
                                                             "text_encoder": "embedded", "dtype": "auto"}},
            "2": {"class_type": "VARE_TextEncode", "inputs": {"model": ["1", 0], "negative_prompt": negative,
                                                              "prompt": "\n".join(words[i % 4] for i in range(lines)),
                                                              "one_prompt_per_line": True}},
            "3": {"class_type": "VARE_Sampler", "inputs": {"model": ["1", 0], "conditioning": ["2", 0], "seed": 0,
                                                           "cfg": "auto", "tau": "auto", "top_k": 0, "top_p": -1.0,
                                                           "resolution": "model default", "batch_size": 1,
                                                           "preview": False}},
            "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}


def test_one_request_with_many_lines_is_bounded_and_free_gives_the_memory_back(server):
    """300 lines with a 1 MB negative prompt once took the server to 10.6 GB and left it at
    9.9 GB after POST /free (the negative prompt tokenised whole, once per line); 100,000
    lines grew it until the kernel killed it. Now: the run stays within 2 GB of where it
    started, /free gives back all but 300 MB, and 100,000 lines are refused at /prompt."""
    import threading
    with pytest.raises(urllib.error.HTTPError) as refused:
        server.post("/prompt", {"prompt": many_lines_graph(100_000, "")})
    details = json.dumps(json.loads(refused.value.read())["node_errors"]["2"]["errors"])
    assert "prompt has 100000 lines (one prompt per line): at most 10000 prompts per run" in details

    start, peak, done = server_rss(server), [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], server_rss(server))
            time.sleep(0.05)
    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        status, history, _ = server.run(many_lines_graph(300, ("a yellow disc " * 80_000)[:1_000_000]), timeout=600)
    finally:
        done.set()
        watcher.join()
    assert status == "execution_success", json.dumps(history.get("status"))[:3000] + server.log_tail()
    assert len(history["outputs"]["4"]["images"]) == 300
    server.post("/free", {"unload_models": True, "free_memory": True})
    time.sleep(12)          # the prompt worker frees, collects, and the pack trims shortly after
    after = server_rss(server)
    print(f"\nserver RSS: {start / 2**20:.0f} MiB before, peak {peak[0] / 2**20:.0f} MiB, "
          f"{after / 2**20:.0f} MiB after POST /free", flush=True)
    assert peak[0] - start < 2 * 2**30
    assert after - start < 300 * 2**20


# ----------------------------------------------------------------------------- running

def test_workflow_1_samples_with_a_preview_per_scale(server, object_info):
    graph = to_api(workflow(WF1), object_info)
    status, history, messages = server.run(graph, timeout=600)
    assert status == "execution_success", json.dumps(history.get("status"))[:3000] + server.log_tail()
    images = history["outputs"][node_of(graph, "PreviewImage")]["images"]
    assert len(images) == 8                                    # 4 prompts x batch 2
    picture = server.image(images[0])
    assert picture.size == (64, 64) and len(picture.convert("L").getcolors(256) or []) > 8
    sampler = node_of(graph, "VARE_Sampler")
    steps = [m["data"]["value"] for m in messages if isinstance(m, dict) and m["type"] == "progress"
             and m["data"]["node"] == sampler]
    assert steps[-5:] == [1, 2, 3, 4, 5]
    assert sum(isinstance(m, bytes) for m in messages) >= 5   # a preview image per scale


def test_comfyui_model_management_lists_unloads_and_reloads_our_models(server, object_info):
    """The loaded transformer, VAE and T5 are ComfyUI-managed models: loading them is logged by
    its model management, a model it still lists is not loaded again, /free (unload_models)
    drops them from its list, and the next sampling loads them again and draws the same images."""
    def loads(name):
        return (server.base / "comfy.log").read_text(errors="replace").count(f"Requested to load {name}")

    def run_seed(seed):
        graph = to_api(workflow(WF1, {("VARE_Sampler", "seed"): seed}), object_info)
        status, history, _ = server.run(graph, timeout=600)
        assert status == "execution_success", json.dumps(history.get("status"))[:3000] + server.log_tail()
        return [server.image(i).tobytes() for i in history["outputs"][node_of(graph, "PreviewImage")]["images"]]

    first = run_seed(11)
    counts = {name: loads(name) for name in ("Infinity", "BSQVAE", "T5Encoder")}
    assert all(n >= 1 for n in counts.values()), (counts, server.log_tail())
    run_seed(12)
    assert loads("Infinity") == counts["Infinity"]      # still listed: not loaded again
    server.post("/free", {"unload_models": True})
    time.sleep(2)                          # the prompt worker handles the flag when it wakes
    run_seed(13)
    assert loads("Infinity") == counts["Infinity"] + 1, server.log_tail()
    assert loads("BSQVAE") == counts["BSQVAE"] + 1
    assert run_seed(11) == first


def test_workflow_2_erases_and_shows_before_after(server, object_info):
    steps = os.environ.get("VARE_E2E_TRAIN_STEPS")
    overrides = {("VARE_TrainErasure", "steps"): int(steps)} if steps else {}
    graph = to_api(workflow(WF2, overrides), object_info)
    status, history, messages = server.run(graph, timeout=3600)
    assert status == "execution_success", json.dumps(history.get("status"))[:3000] + server.log_tail()
    outputs = history["outputs"]
    grid = server.image(outputs[node_of(graph, "VARE_CompareGrid")]["images"][0])
    assert grid.width >= 2 * 160 and grid.height >= 6 * 160
    report = outputs[node_of(graph, "VARE_ErasureCheck")]["text"][0]
    print("\nErasure Check:", report)
    assert "circle (shape) in" in report and "of 6 images" in report
    assert (server.base / "models" / "vare" / "erase_circle.safetensors").is_file()
    train = [m["data"] for m in messages if isinstance(m, dict) and m["type"] == "vare.train"]
    assert train[0]["phase"] == "start" and train[-1]["phase"] == "done"
    seen = [d["step"] for d in train if d["phase"] == "train"]
    assert len(seen) >= 2 and seen == sorted(seen)


def test_workflow_5_applies_the_saved_adapter(server, object_info):
    if not (server.base / "models" / "vare" / "erase_circle.safetensors").is_file():
        pytest.skip("workflow 2 did not save erase_circle.safetensors in this server")
    graph = to_api(workflow(REPO / "workflows" / "vare_load_and_apply_adapter.json"), object_info)
    status, history, _ = server.run(graph, timeout=600)
    assert status == "execution_success", json.dumps(history.get("status"))[:3000] + server.log_tail()
    grid = server.image(history["outputs"][node_of(graph, "VARE_CompareGrid")]["images"][0])
    assert grid.width >= 2 * 160 and grid.height >= 4 * 160


def test_the_concept_guard_workflow_erases_without_training(server, object_info):
    graph = to_api(workflow(REPO / "workflows" / "vare_embedded_concept_guard.json"), object_info)
    status, history, messages = server.run(graph, timeout=600)
    assert status == "execution_success", json.dumps(history.get("status"))[:3000] + server.log_tail()
    outputs = history["outputs"]
    grid = server.image(outputs[node_of(graph, "VARE_CompareGrid")]["images"][0])
    assert grid.width >= 2 * 160 and grid.height >= 5 * 160
    report = outputs[node_of(graph, "VARE_ErasureCheck")]["text"][0]
    print("\nErasure Check (guard):", report)
    assert "circle (shape) in 0 of 5 images" in report
    guarded = [n for n, spec in graph.items() if spec["class_type"] == "VARE_Sampler"
               and spec["inputs"].get("preview_guard_mask")]
    steps = [m["data"]["value"] for m in messages if isinstance(m, dict) and m["type"] == "progress"
             and m["data"]["node"] in guarded]
    assert guarded and steps[-5:] == [1, 2, 3, 4, 5]


def test_cancel_keeps_the_partial_adapter(server, object_info):
    graph = to_api(workflow(WF2, {("VARE_TrainErasure", "steps"): 5000}), object_info)
    interrupted = []

    def interrupt_after_three_steps(message):
        if isinstance(message, dict) and message["type"] == "vare.train" and \
                message["data"].get("step", 0) >= 3 and not interrupted:
            interrupted.append(server.post("/interrupt", {}))
    status, history, messages = server.run(graph, timeout=1800, on_message=interrupt_after_three_steps)
    assert status == "execution_interrupted", server.log_tail()
    cancelled = [m["data"] for m in messages if isinstance(m, dict) and m["type"] == "vare.train"
                 and m["data"]["phase"] == "cancelled"][0]
    path = Path(cancelled["path"])
    assert path.parent == server.base / "models" / "vare" / "partial" and path.is_file()
    assert 3 <= cancelled["step"] < 5000 and path.with_suffix(".loss.json").is_file()


@pytest.mark.skipif(not CHROMIUM, reason="no chromium for the browser check (apt-get install chromium)")
def test_browser_shows_the_nodes_and_a_live_loss_chart(server, tmp_path):
    artifacts = Path(os.environ.get("VARE_E2E_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    # a returning user's settings: no first-run template dialog over the canvas, readable text
    server.post("/settings", {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                              "LiteGraph.Canvas.MinFontSizeForLOD": 1})
    proc, page = launch_chromium(CHROMIUM, size=(2000, 1200))
    try:
        page.call("Page.enable")
        page.call("Page.navigate", url=server.url + "/")
        page.wait_for("!!(window.app && app.graph && app.extensionManager)", timeout=600, interval=2)
        version = page.js("window.__COMFYUI_FRONTEND_VERSION__ || 'unknown'")
        print(f"\nfrontend {version}", flush=True)
        assert page.js("app.extensions.some(e => e.name === 'vare.nodes')")
        registered = page.js("Object.keys(LiteGraph.registered_node_types).filter(k => k.startsWith('VARE_'))")
        assert sorted(registered) == sorted(k for k in object_info_of_pack() if k.startswith("VARE_"))
        graph = workflow(WF2, {("VARE_TrainErasure", "steps"): 40})
        page.js(f"app.loadGraphData({json.dumps(graph)}).then(() => true)")
        train_id = next(n["id"] for n in graph["nodes"] if n["type"] == "VARE_TrainErasure")
        node = f"app.graph.getNodeById({train_id})"
        assert page.js(f"{node}.color") == "#6b2e2e"           # the pack's colour for erasure nodes
        page.js("app.extensionManager.command.execute('Comfy.Canvas.FitView').then(() => true)")
        page.js("app.queuePrompt(0, 1).then(() => true)")
        seen, end = [], time.time() + 1800
        while time.time() < end:
            state = page.js(f"(s => s ? [s.phase, s.step, s.points.length, s.updates] : null)({node}.vareTrain)")
            if state and (not seen or state != seen[-1]):
                seen.append(state)
                if len(seen) == 3:
                    page.screenshot(str(artifacts / "loss_chart_during_training.png"))
            if state and state[0] in ("done", "cancelled"):
                break
            time.sleep(0.5)
        page.screenshot(str(artifacts / "loss_chart_after_training.png"))
        print(f"\nchart states seen: {len(seen)}, last {seen[-1] if seen else None}; screenshots in {artifacts}")
        training = [s for s in seen if s[0] == "train"]
        assert seen and seen[-1][0] == "done" and seen[-1][1] == 40
        assert len({s[1] for s in training}) >= 3          # the chart moved while training ran
        assert seen[-1][2] >= 20                            # loss points drawn
    finally:
        proc.kill()
