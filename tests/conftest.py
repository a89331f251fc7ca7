from __future__ import annotations

import torch

# Two cores on CI: keep torch from oversubscribing them when tests run beside worker processes.
torch.set_num_threads(1)
