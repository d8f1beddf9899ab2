"""Your own training loop with a psops_mpi synchroniser: four calls per step.

    mpiexec -n 2 python examples/library_loop.py

Every rank trains its own shard of a small synthetic task (no download) and every 8 steps
the ranks synchronise with PSO-PS; swap the synchroniser for PASync, SlowMoSync or SSGDSync
to compare. Prints, on rank 0, the test accuracy of the swarm's answer after each epoch.
"""

import torch
import torch.nn.functional as F
from mpi4py import MPI

import psops_mpi
from psops_mpi.data import ShardedBatches, eval_shard, load_dataset

comm = MPI.COMM_WORLD
rank, world_size = comm.Get_rank(), comm.Get_size()

data = load_dataset("synthetic", data_dir=None)          # 2,048 train / 512 test samples
batches = ShardedBatches(data, rank, world_size, batch_size=32, seed=0)
test_x, test_y = eval_shard(data, rank, world_size)      # this rank's part of the test set

torch.manual_seed(0)                                      # the same model on every rank
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
sync = psops_mpi.PSOSync(model, optimizer, comm, sync_every=8)
# or psops_mpi.PASync(model, optimizer, comm, sync_every=8), psops_mpi.SlowMoSync(...),
#    psops_mpi.SSGDSync(model, optimizer, comm)

for epoch in range(3):
    for x, y in batches.epoch(epoch):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        sync.after_backward()                             # SSGD: allreduce of the gradient
        optimizer.step()
        sync.after_step(loss)                             # every 8 steps: a round
    sync.flush()                                          # finish a partial period
    with sync.consensus(), torch.no_grad():               # PSO-PS: the swarm's answer
        correct = (model(test_x).argmax(1) == test_y).sum().item()
    correct = comm.allreduce(correct)                     # over every rank's part
    if rank == 0:
        print(f"epoch {epoch + 1}: test accuracy {correct / len(data.y_test):.3f}")

if rank == 0:
    print(sync.metrics().as_dict())                       # steps, rounds, bytes, seconds, ...
