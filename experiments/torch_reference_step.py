"""Times a PyTorch step shaped like the reference MocoSFL step, on this machine, and writes JSON.

    pip install torch --index-url https://download.pytorch.org/whl/cpu   # not a dependency
    python experiments/torch_reference_step.py --out experiments/results/torch_reference_cpu.json

Issue 2 quotes the official PyTorch implementation at about 3.0 s per step on
"this 2-core machine type", but shared machines of that type differ by up to 2x
(design/performance-notes.md). This script rebuilds the reference's per-step
compute with the same model (GroupNorm + weight-standardized ResNet-18, V2
head) so that experiments/benchmark.py can be compared on the same machine
within the hour: a Python loop of per-client forwards (online on view 1, EMA on
view 2), the concatenated batch through the online server twice with backward
(the two terms of the symmetric loss) and the EMA server twice without,
InfoNCE against a 6000-key queue, SGD on the server and on every client, EMA
updates. Augmentation is left out (the JAX step includes it: about 12 ms).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import results_file  # experiments/, beside this script


class WSConv(nn.Conv2d):
  """Weight-standardized convolution (epsilon outside the square root, as the reference)."""

  def forward(self, x):
    w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
    w = w / (w.flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-5)
    return F.conv2d(x, w, None, self.stride, self.padding)


def norm(c):
  return nn.GroupNorm(c // 4, c)


class Block(nn.Module):

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.c1, self.n1 = WSConv(cin, cout, 3, stride, 1, bias=False), norm(cout)
    self.c2, self.n2 = WSConv(cout, cout, 3, 1, 1, bias=False), norm(cout)
    self.shortcut = nn.Sequential()
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(WSConv(cin, cout, 1, stride, bias=False), norm(cout))

  def forward(self, x):
    y = F.relu(self.n1(self.c1(x)))
    return F.relu(self.shortcut(x) + self.n2(self.c2(y)))


def modules():
  stem = nn.Sequential(WSConv(3, 64, 3, 1, 1, bias=False), norm(64), nn.ReLU())
  blocks, cin = [], 64
  for cout, stride in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                       (512, 1)]:
    blocks.append(Block(cin, cout, stride))
    cin = cout
  return [stem] + blocks


def build(cut_layer):
  mods = modules()
  client = nn.Sequential(*mods[:cut_layer])
  server = nn.Sequential(*mods[cut_layer:], nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024))
  return client, server


def ema_update(online, ema, tau=0.99):
  with torch.no_grad():
    for p, q in zip(online.parameters(), ema.parameters()):
      q.mul_(tau).add_(p, alpha=1 - tau)


def info_nce(q, k, queue):
  q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
  logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / 0.1
  return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))


def build_step(clients, batch, cut_layer):
  """``step() -> loss``: one reference-shaped step on fixed views, updating the models in place."""
  torch.manual_seed(0)
  client, server = build(cut_layer)
  client_models = [copy.deepcopy(client) for _ in range(clients)]
  client_emas = [copy.deepcopy(client) for _ in range(clients)]
  server_ema = copy.deepcopy(server)
  opt = lambda params: torch.optim.SGD(params, lr=0.06, momentum=0.9, weight_decay=5e-4)
  client_opts = [opt(m.parameters()) for m in client_models]
  server_opt = opt(server.parameters())
  queue = F.normalize(torch.randn(6000, 1024), dim=1)
  view1 = torch.randn(clients, batch, 3, 32, 32)
  view2 = torch.randn(clients, batch, 3, 32, 32)

  def step():
    smashed, inputs = [], []
    for j in range(clients):  # the reference's sequential client calls
      out = client_models[j](view1[j])
      detached = out.detach().requires_grad_()
      smashed.append(out)
      inputs.append(detached)
      ema_update(client_models[j], client_emas[j])
    with torch.no_grad():
      keys_in = torch.cat([client_emas[j](view2[j]) for j in range(clients)])
    query_in = torch.cat(inputs)
    ema_update(server, server_ema)
    with torch.no_grad():
      k2, k1 = server_ema(keys_in), server_ema(query_in)
    server_opt.zero_grad()
    loss = info_nce(server(query_in), k2, queue) + info_nce(server(keys_in), k1, queue)
    loss.backward()
    server_opt.step()
    for j in range(clients):
      client_opts[j].zero_grad()
      smashed[j].backward(inputs[j].grad)
      client_opts[j].step()
    return float(loss.detach())

  return step


def time_setting(clients, batch, cut_layer, repeats):
  step = build_step(clients, batch, cut_layer)
  step()  # warm-up
  times = []
  for _ in range(repeats):
    tick = time.perf_counter()
    step()
    times.append(time.perf_counter() - tick)
  median = statistics.median(times)
  return {'clients': clients, 'batch_per_client': batch, 'cut_layer': cut_layer,
          'step_seconds_median': median, 'step_seconds_all': times,
          'images_per_second': 2 * clients * batch / median}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--settings', default='a,b,c')
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  settings = {'a': (100, 1, 1), 'b': (100, 1, 2), 'c': (5, 20, 1)}
  results = results_file.new(torch_version=torch.__version__, threads=torch.get_num_threads())
  for name in args.settings.split(','):
    run = time_setting(*settings[name], repeats=args.repeats)
    results_file.add_run(results, {**run, 'setting': name}, args.out)

if __name__ == '__main__':
  main()
