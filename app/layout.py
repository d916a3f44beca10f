"""The Gradio layout: a model panel above five tabs, wired to :mod:`app.handlers`."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from app import cache_writes, generate_tab, viewer3d
from app import handlers as h
from app.models import ModelManager
from app.session import cleanup_session
from atoken.io.media import IMAGE_EXTENSIONS, MESH_EXTENSIONS, VIDEO_EXTENSIONS
from atoken.pipelines.visualize import HOW_TO_READ

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EXAMPLE_IMAGES = sorted(str(p) for p in (ASSETS / "examples").glob("*.png"))
EXAMPLE_VIDEOS = sorted(str(p) for p in (ASSETS / "examples").glob("*.mp4"))
EXAMPLE_MESHES = [
    str(p)
    for folder in (ASSETS / "examples", ASSETS / "meshes")
    for p in sorted(folder.glob("*"))
    if p.suffix in MESH_EXTENSIONS
]
PNG = "png"  # every pixel output: Gradio's default webp would corrupt the comparison
VIEWER_HEIGHT = 320  # px, both 3D viewers
INTRO = """\
# AToken: one tokenizer for images, videos and 3D
Upload an image, a video or a mesh, see it beside its reconstruction, look inside the latent
tokens, classify it from typed labels, and generate from the latents. Every tab calls the
[`atoken`](https://arxiv.org/abs/2509.14476) library; the same calls work from Python.
"""


def _model_panel(m: ModelManager, switchable: bool) -> tuple[gr.Markdown, gr.State]:
    """The status line, and the model choice of this visitor's session."""
    status = gr.Markdown(m.status(), elem_id="model-status")
    model_st = gr.State(m.key)  # each session's own choice; new sessions start on m.key
    if not switchable:  # the operator fixed one model for every visitor
        return status, model_st
    with gr.Accordion("Model", open=False, elem_id="model-panel"):
        gr.Markdown(
            "Your choice applies to your session only. The server's operator decides which "
            f"models are offered; they run on {m.device} in {m.dtype_name}."
        )
        with gr.Row():
            key = gr.Dropdown(
                h.model_choices(), value=m.key, label="Model", scale=2, elem_id="model-key"
            )
            load_btn = gr.Button("Load", variant="primary", elem_id="model-load")
        info = gr.Markdown()
        if m.policy.allow_downloads:
            download_btn = gr.Button("Download official weights", interactive=False)
            dl_status = gr.Markdown()
            download_btn.click(
                h.download_model, key, dl_status, api_visibility="private", concurrency_limit=1
            )
            key.change(h.model_info, key, [info, download_btn], api_visibility="private")
        else:
            key.change(lambda k: h.model_info(k)[0], key, info, api_visibility="private")
    load_btn.click(
        h.load_model,
        [key, model_st],
        [status, key, model_st],
        api_visibility="private",
        concurrency_id="gpu",
    )
    return status, model_st


def _image_tab(max_side_limit: int) -> dict:
    with gr.Row():
        with gr.Column():
            image = gr.Image(
                type="filepath",
                label="Image (upload, paste or webcam)",
                height=360,  # keeps its size when a file cannot be shown
                sources=["upload", "clipboard", "webcam"],
                elem_id="image-input",
            )
            gr.Examples(EXAMPLE_IMAGES, image, label="Examples (assets/examples)")
            with gr.Row():
                max_side = gr.Slider(0, max_side_limit, 256, step=16, label="Max side (0 = keep)")
                tokens = gr.Radio(
                    [h.CONTINUOUS, h.DISCRETE],
                    value=h.CONTINUOUS,
                    label="Tokens",
                    elem_id="image-tokens",
                )
            with gr.Accordion("Sampling", open=False):
                latent_mode = gr.Radio(
                    ["mean", "sample"],
                    value="mean",
                    label="Continuous latent: posterior mean or a sample",
                )
                seed = gr.Number(0, precision=0, label="Seed")
                temperature = gr.Slider(0, 3, 1, step=0.05, label="Temperature")
                gr.Markdown(
                    "A sample is mean + temperature x std x noise. The posterior can be very "
                    "narrow (atoken-tiny's std is about 1/2000 of its latent's spread), so a "
                    "sample may look exactly like the mean: Generation > Posterior variations "
                    "gives the numbers for your image."
                )
            run = gr.Button("Reconstruct", variant="primary", elem_id="image-run")
        with gr.Column():
            preview = gr.Image(
                label="Model input (cropped to the 16-px grid)",
                format=PNG,
                interactive=False,
                elem_id="image-preview",
            )
            preview_info = gr.Markdown(elem_id="image-preview-info")
    with gr.Row():
        slider = gr.ImageSlider(
            label="Original | reconstruction (scroll or pinch to zoom)",
            format=PNG,
            elem_id="image-slider",
        )
        heat = gr.Image(
            label="Error heatmap, fixed scale: black = exact, yellow-white = off by 64 or "
            "more of 255 grey levels",
            format=PNG,
            interactive=False,
            elem_id="image-heatmap",
        )
    with gr.Row():
        metrics = gr.JSON(label="Metrics (computed on the server arrays)", elem_id="image-metrics")
        files = gr.File(
            label="Downloads: reconstruction, cropped input, tokens",
            file_count="multiple",
            elem_id="image-files",
        )
    with gr.Accordion(
        "Against JPEG / WebP / AVIF at the same bits", open=False, elem_id="codec-panel"
    ):
        gr.Markdown(
            "Each codec (through Pillow) encodes the model input at the largest quality whose "
            "file fits the bits of this image's tokens; its curve is a sweep of qualities. "
            "A few seconds on a CPU."
        )
        codec_run = gr.Button("Compare with JPEG / WebP / AVIF", elem_id="codec-run")
        codec_table = gr.Markdown(
            "Reconstruct an image, then press the button.", elem_id="codec-table"
        )
        codec_gallery = gr.Gallery(
            label="Tokens | JPEG | WebP | AVIF at the same bits",
            format=PNG,
            columns=4,
            height=300,
            elem_id="codec-gallery",
        )
        with gr.Row():
            codec_plot = gr.Plot(label="Rate-distortion", elem_id="codec-plot")
            codec_files = gr.File(
                label="The codec files", file_count="multiple", elem_id="codec-files"
            )
    gr.Markdown("## Latent view")
    with gr.Accordion("How to read this", open=False):
        gr.Markdown(HOW_TO_READ)
    with gr.Row():
        pca = gr.Image(
            label="PCA of the latent tokens as RGB",
            format=PNG,
            interactive=False,
            elem_id="latent-pca",
        )
        maps = gr.Image(
            label="Per-channel maps", format=PNG, interactive=False, elem_id="latent-maps"
        )
    pca_info = gr.Markdown()
    with gr.Row():
        hist = gr.Plot(label="Value histograms", elem_id="latent-hist")
        scatter = gr.Plot(label="Tokens in PCA space", elem_id="latent-scatter")
    with gr.Row():
        usage = gr.Plot(label="FSQ code usage", elem_id="latent-usage")
        pooled = gr.Plot(label="Pooled feature", elem_id="latent-pooled")
    return locals()


def _video_tab(limits: h.Limits) -> dict:
    lim = limits.video
    with gr.Row():
        with gr.Column():
            video = gr.Video(
                label="Video (mp4, webm, mov, gif)",
                sources=["upload"],
                include_audio=True,
                elem_id="video-input",
            )
            gr.Examples(EXAMPLE_VIDEOS, video, label="Examples")
            video_info = gr.Markdown(elem_id="video-info")
            gr.Markdown(
                f"Limits: {lim.max_duration:.0f} s, {lim.max_frames} frames after the stride, "
                f"{lim.max_side} px per side (set a max side to downscale), "
                f"{limits.video_bytes // 2**20} MB."
            )
            with gr.Row():
                stride = gr.Slider(1, 8, 1, step=1, label="Frame stride")
                max_side = gr.Slider(0, limits.max_side, 256, step=16, label="Max side (0 = keep)")
                max_frames = gr.Slider(0, lim.max_frames, 64, step=4, label="Max frames (0 = all)")
            tokens = gr.Radio(
                [h.CONTINUOUS, h.DISCRETE],
                value=h.CONTINUOUS,
                label="Tokens",
                elem_id="video-tokens",
            )
            run = gr.Button("Reconstruct video", variant="primary", elem_id="video-run")
        with gr.Column():
            side = gr.Video(
                label="Original | reconstruction (one synced video)",
                elem_id="video-side",
                autoplay=True,
                loop=True,
            )
            pca = gr.Video(label="Latent PCA video", elem_id="video-pca", loop=True)
    with gr.Row():
        psnr = gr.Plot(label="PSNR per frame", elem_id="video-psnr")
        with gr.Column():
            metrics = gr.JSON(label="Metrics", elem_id="video-metrics")
            files = gr.File(label="Downloads", file_count="multiple", elem_id="video-files")
    return locals()


def _asset_tab() -> dict:
    gr.Markdown(
        "Mesh -> multiview renders -> 64³ voxels -> AToken tokens -> 3D Gaussians (.ply). "
        "Formats: .glb .gltf .obj .ply .stl .off, or a .zip with textures. On a CPU, big "
        "meshes take minutes (hundreds of thousands of Gaussians are rendered for the metrics "
        "and the turntable); the pencil example takes seconds."
    )
    with gr.Row():
        with gr.Column():
            mesh = gr.File(label="Mesh", file_types=sorted(MESH_EXTENSIONS), elem_id="mesh-input")
            gr.Examples(EXAMPLE_MESHES, mesh, label="Examples")
            with gr.Row():
                views = gr.Slider(4, 64, 16, step=4, label="Views")
                resolution = gr.Slider(128, 512, 256, step=64, label="Render resolution")
                frames = gr.Slider(0, 48, 12, step=4, label="Turntable frames (0 = none)")
            run = gr.Button("Reconstruct 3D", variant="primary", elem_id="mesh-run")
        # A fixed height: a viewer sized by its content was once seen collapsed to a line
        # after an upload (the browser test's input-viewer check failed, 1 run in 3).
        input_view = gr.Model3D(
            label="Input (normalised)",
            elem_id="mesh-view",
            **viewer3d.mesh_viewer(VIEWER_HEIGHT),  # the splat viewer's pose and framing
        )
    with gr.Row():
        output_view = gr.Model3D(
            label="Reconstructed Gaussians (.ply)",
            elem_id="gs-view",
            **viewer3d.splat_viewer(VIEWER_HEIGHT),
        )
        turntable = gr.Video(
            label="Turntable: input | reconstruction",
            elem_id="mesh-turntable",
            autoplay=True,
            loop=True,
        )
    with gr.Row():
        metrics = gr.JSON(
            label="3D metrics (PSNR / SSIM over rendered views)", elem_id="mesh-metrics"
        )
        files = gr.File(label="Downloads", file_count="multiple", elem_id="mesh-files")
    return locals()


def _zeroshot_tab() -> dict:
    gr.Markdown(
        "Score typed labels against the pooled feature of a result from another tab "
        "or of a new upload (image, video or mesh). The bundled `atoken-tiny` knows only the "
        "generated world's shapes and colours (see the preset): on real photos its labels are "
        "guesses; official weights classify real photos."
    )
    with gr.Row():
        with gr.Column():
            source = gr.Radio(
                [h.FROM_IMAGE, h.FROM_VIDEO, h.FROM_3D, h.NEW_UPLOAD],
                value=h.NEW_UPLOAD,
                label="Item",
                elem_id="zs-source",
            )
            upload = gr.File(
                label="New upload",
                elem_id="zs-upload",
                file_types=sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS | MESH_EXTENSIONS),
            )
            preset = gr.Dropdown(
                list(h.LABEL_PRESETS), value="everyday things", label="Label presets"
            )
            labels = gr.Textbox(
                h.LABEL_PRESETS["everyday things"],
                lines=3,
                label="Labels (comma or newline separated)",
                elem_id="zs-labels",
            )
            kind = gr.Radio(
                ["sigmoid", "softmax"],
                value="sigmoid",
                label="Probabilities: per label (SigLIP sigmoid) or softmax",
            )
            run = gr.Button("Classify", variant="primary", elem_id="zs-run")
        with gr.Column():
            plot = gr.Plot(label="Probabilities", elem_id="zs-plot")
            verdict = gr.Markdown(elem_id="zs-verdict")
            with gr.Accordion("All probabilities (JSON)", open=False):
                probs = gr.JSON(label="Probabilities", elem_id="zs-probs")
    return locals()


def _generation_tab() -> dict:
    gr.Markdown("Works on the latent of the last image reconstructed in the image tab.")
    with gr.Tab("Interpolation"), gr.Row():
        with gr.Column():
            image_b = gr.Image(
                type="filepath",
                label="Image B",
                sources=["upload", "clipboard"],
                elem_id="interp-b",
            )
            gr.Examples(EXAMPLE_IMAGES, image_b, label="Examples")
            steps = gr.Slider(2, 32, 8, step=1, label="Steps")
            mode = gr.Radio(["slerp", "lerp"], value="slerp", label="Path")
            interp = gr.Button(
                "Interpolate", variant="primary", interactive=False, elem_id="interp-run"
            )
        with gr.Column():
            interp_video = gr.Video(
                label="A -> B -> A", autoplay=True, loop=True, elem_id="interp-video"
            )
            interp_gallery = gr.Gallery(
                label="Steps", format=PNG, columns=4, elem_id="interp-gallery"
            )
    with gr.Tab("Posterior variations"), gr.Row():
        with gr.Column():
            n = gr.Slider(1, 8, 4, step=1, label="Samples")
            temperature = gr.Slider(0, 3, 1, step=0.05, label="Temperature")
            seed = gr.Number(
                0, precision=0, label="Seed (written back after each run)", elem_id="var-seed"
            )
            new_seed = gr.Checkbox(True, label="Draw a new seed each run")
            vary = gr.Button("Sample", variant="primary", interactive=False, elem_id="var-run")
        with gr.Column():
            vary_note = gr.Markdown(elem_id="var-note")
            gallery = gr.Gallery(label="Samples", format=PNG, columns=4, elem_id="var-gallery")
    with gr.Tab("Token editing (FSQ)"):
        edit_note = gr.Markdown()
        with gr.Row():
            with gr.Column():
                editor = gr.ImageEditor(
                    type="numpy",
                    label="Paint the region to change",
                    sources=[],
                    transforms=[],
                    layers=False,
                    format=PNG,
                    brush=gr.Brush(colors=["#ff00ff"], default_size=24),
                    elem_id="edit-canvas",
                )
                source = gr.Radio(
                    [h.RANDOM_CODES, h.OTHER_IMAGE], value=h.RANDOM_CODES, label="New codes"
                )
                other = gr.Image(type="filepath", label="Other image", sources=["upload"])
                edit_seed = gr.Number(0, precision=0, label="Seed for random codes")
                edit = gr.Button(
                    "Swap codes and decode",
                    variant="primary",
                    interactive=False,
                    elem_id="edit-run",
                )
            edited = gr.ImageSlider(
                label="Reconstruction | edited", format=PNG, elem_id="edit-slider"
            )
    # its 3D viewer mounts only once the sub-tab is on screen (Model3D in hidden tabs collapses)
    with gr.Tab("Text to image / video / 3D", id="text-to", render_children=False):
        text_to = generate_tab.layout()
    return locals()


def build_demo(
    m: ModelManager, limits: h.Limits | None = None, *, switchable: bool = True
) -> gr.Blocks:
    """The whole app for one model manager (``switchable=False`` hides the model controls)."""
    h.configure(m, limits)
    limits = h.LIMITS
    cache_writes.install()
    with gr.Blocks(title="AToken demo", delete_cache=(600, 3600), analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        status, model_st = _model_panel(m, switchable)
        image_st, video_st, asset_st = gr.State(None), gr.State(None), gr.State(None)
        with gr.Tabs():
            with gr.Tab("Image", id="image"):
                im = _image_tab(limits.max_side)
            with gr.Tab("Video", id="video"):
                vi = _video_tab(limits)
            # Model3D collapses when it is first drawn inside a hidden tab (a known Gradio issue):
            # with render_children=False the viewers mount only once this tab is on screen.
            with gr.Tab("3D", id="3d", render_children=False):
                a3 = _asset_tab()
            with gr.Tab("Zero-shot", id="zeroshot"):
                zs = _zeroshot_tab()
            with gr.Tab("Generation", id="generation"):
                ge = _generation_tab()
        _wire(demo, status, model_st, im, vi, a3, zs, ge, image_st, video_st, asset_st)
    return demo


def _wire(demo, status, model_st, im, vi, a3, zs, ge, image_st, video_st, asset_st) -> None:
    gpu = {"concurrency_id": "gpu"}
    private = {"api_visibility": "private"}
    # Every event taking a file gets the raw payload (preprocess=False): Gradio's own
    # preprocessing would open payloads it has not checked; app.uploads.upload_path accepts
    # only this server's uploads, and the validators and atoken.io.media read them with limits
    # and readable errors.
    raw = {"preprocess": False}
    # image
    for trigger in (im["image"].change, im["max_side"].release):
        trigger(
            h.preview_image,
            [im["image"], im["max_side"]],
            [im["preview"], im["preview_info"]],
            **private,
            **raw,
        )
    codec_outputs = [im["codec_gallery"], im["codec_table"], im["codec_plot"], im["codec_files"]]
    im["run"].click(h.codecs_stale, None, codec_outputs, **private)
    im["codec_run"].click(
        h.compare_codecs_handler,
        [image_st, model_st],
        codec_outputs,
        api_name="compare_codecs",
        **gpu,
    )
    im["run"].click(
        h.reconstruct_image_handler,
        [
            im["image"],
            im["max_side"],
            im["tokens"],
            im["latent_mode"],
            im["seed"],
            im["temperature"],
            model_st,
        ],
        [im["slider"], im["heat"], im["metrics"], im["files"], image_st],
        api_name="reconstruct_image",
        validator=h.validate_image,
        **gpu,
        **raw,
    ).success(
        h.latent_view,
        image_st,
        [
            im["pca"],
            im["maps"],
            im["hist"],
            im["usage"],
            im["pooled"],
            im["scatter"],
            im["pca_info"],
        ],
        **private,
    ).then(
        h.after_image,
        image_st,
        [ge["interp"], ge["vary"], ge["edit"], ge["editor"], ge["edit_note"], ge["vary_note"]],
        **private,
    )
    # video
    vi["run"].click(
        h.reconstruct_video_handler,
        [vi["video"], vi["stride"], vi["max_side"], vi["max_frames"], vi["tokens"], model_st],
        [vi["side"], vi["psnr"], vi["pca"], vi["metrics"], vi["files"], video_st],
        api_name="reconstruct_video",
        validator=h.validate_video,
        **gpu,
        **raw,
    )
    for trigger in (vi["video"].change, vi["stride"].release, vi["max_frames"].release):
        trigger(
            h.preview_video,
            [vi["video"], vi["stride"], vi["max_frames"]],
            vi["video_info"],
            **private,
            **raw,
        )
    # 3D
    a3["mesh"].change(h.preview_mesh, a3["mesh"], a3["input_view"], **private, **raw)
    a3["run"].click(
        h.reconstruct_3d_handler,
        [a3["mesh"], a3["views"], a3["resolution"], a3["frames"], model_st],
        [
            a3["input_view"],
            a3["output_view"],
            a3["turntable"],
            a3["metrics"],
            a3["files"],
            asset_st,
        ],
        api_name="reconstruct_3d",
        validator=h.validate_mesh,
        **gpu,
        **raw,
    )
    # zero-shot
    zs["preset"].change(h.fill_labels, zs["preset"], zs["labels"], **private)
    zs["run"].click(
        h.classify_handler,
        [
            zs["source"],
            zs["upload"],
            zs["labels"],
            zs["kind"],
            image_st,
            video_st,
            asset_st,
            model_st,
        ],
        [zs["plot"], zs["verdict"], zs["probs"]],
        api_name="classify",
        validator=h.validate_upload,
        **gpu,
        **raw,
    )
    # generation
    ge["interp"].click(
        h.interpolate_handler,
        [ge["image_b"], ge["steps"], ge["mode"], image_st, model_st],
        [ge["interp_video"], ge["interp_gallery"]],
        api_name="interpolate",
        validator=h.validate_second_image,
        **gpu,
        **raw,
    )
    ge["vary"].click(
        h.variations_handler,
        [ge["n"], ge["temperature"], ge["seed"], ge["new_seed"], image_st, model_st],
        [ge["gallery"], ge["seed"]],
        api_name="variations",
        **gpu,
    )
    ge["edit"].click(
        h.edit_handler,
        [ge["editor"], ge["source"], ge["other"], ge["edit_seed"], image_st, model_st],
        ge["edited"],
        api_name="edit_tokens",
        **gpu,
        **raw,
    )
    generate_tab.wire(ge["text_to"], zs, image_st, video_st, asset_st, model_st)
    demo.load(h.status, model_st, status, **private)
    demo.unload(cleanup_session)
