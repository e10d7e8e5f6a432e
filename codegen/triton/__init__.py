"""Triton lowerings of the llmc ops: jinja2 templates (templates/<op>.py.j2) rendered into Triton source per
dtype, shape and block configuration (render.py), block configurations per arch and shape class with an
autotuner (configs.py), and one launcher per op plus their registration as the ops' CUDA kernels (launch.py).

Nothing here imports triton at package import: triton is an optional dependency (the `gpu` extra), and a CPU
host that only runs references must not need it. Import `llmc.codegen.triton.launch` to launch kernels.
"""
