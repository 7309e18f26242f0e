# One image for every stagemesh role; the compose file picks the role by the command:
#   python -m stage_worker ... | python -m expert_worker ... | python -m gateway ... | python -m frontend ...
#   stagemesh topology ... (the planner service) | stagemesh health --addr ... (health checks)
# Build: docker build -t stagemesh:latest .
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/stagemesh
COPY pyproject.toml README.md ./
COPY stagemesh ./stagemesh
COPY stage_worker ./stage_worker
COPY expert_worker ./expert_worker
COPY gateway ./gateway
COPY frontend ./frontend

# The image's CUDA torch satisfies the `torch>=2.4` dependency; the constraint keeps pip from
# replacing it with another build.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch.txt \
    && pip install --no-cache-dir --constraint /tmp/torch.txt . \
    && rm /tmp/torch.txt

# Run as a plain user (numeric, so the runtime need not resolve the name).
RUN groupadd --gid 10001 stagemesh && useradd --uid 10001 --gid 10001 --create-home stagemesh
USER 10001:10001
WORKDIR /home/stagemesh

CMD ["stagemesh", "--help"]
