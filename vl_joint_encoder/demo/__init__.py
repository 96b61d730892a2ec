"""The demo: a generated multimodal toy world (`toy_world`, `render`), a tiny joint encoder with a frozen random CLIP
tower (`tiny_model`), and the end-to-end run of `vl-joint-encoder demo` (`run`, arguments in `commands.demo`)."""
