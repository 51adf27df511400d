//! Data-parallel training over several devices with burn's multi-device machinery: the scheme of
//! burn-train's `ExecutionStrategy::MultiDevice` with `MultiDeviceOptim::OptimMainDevice`. Each
//! step splits the batch into one contiguous shard per device; a worker thread per device forks
//! the model onto it (`Module::fork`: same parameter ids, fresh autodiff leaves), computes its
//! shard's loss and gradients; the gradients come back to the main device
//! (`GradientsParams::to_device`), are summed there (`GradientsAccumulator`) and one optimiser
//! step updates the main copy, which every worker forks again on the next step.
//!
//! Each shard's loss is weighted by its share of the batch, so the summed gradient is the
//! gradient of the whole batch's mean loss: N devices with a global batch B train the same model
//! as one device with batch B, up to the order of float additions.
//!
//! burn's DDP strategy (`DistributedDataParallel`, collective all-reduce) is not used: in burn
//! 0.22.1 only the CUDA and remote backends implement collective operations; on the CPU backends
//! `all_reduce` is a trait default that panics.

use std::ops::Range;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;

use crate::error::{Error, Result};

/// Contiguous row ranges of a batch of `batch` rows over `n` devices: sizes differ by at most one,
/// the first devices take the extra rows; a device gets an empty range when `batch < n`.
pub fn shards(batch: usize, n: usize) -> Vec<Range<usize>> {
    let n = n.max(1);
    let (base, extra) = (batch / n, batch % n);
    let mut start = 0;
    (0..n)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// One device's part of a data-parallel step.
pub struct Shard<'a> {
    /// Position of the device in the `devices` list (to pick per-device copies of frozen
    /// models).
    pub index: usize,
    /// The batch rows of this shard.
    pub rows: Range<usize>,
    /// The device, with autodiff (the model was forked onto it).
    pub device: &'a Device,
}

impl Shard<'_> {
    /// This shard's rows of a batch tensor (dimension 0), moved to the shard's device without
    /// autodiff (frozen models run on them; call `.autodiff()` for what the model trains on).
    pub fn take<const D: usize, K: burn::tensor::kind::Basic>(
        &self,
        batch: &Tensor<D, K>,
    ) -> Tensor<D, K> {
        batch
            .clone()
            .narrow(0, self.rows.start, self.rows.len())
            .to_device(&self.device.clone().without_autodiff())
    }

    /// This shard's entries of a per-row list.
    pub fn take_list<T: Clone>(&self, list: &[T]) -> Vec<T> {
        list[self.rows.clone()].to_vec()
    }
}

/// One copy of a frozen (no-autodiff) module per device, for the shard closures of
/// [`loss_and_grads`] (`copies[shard.index]`); with one device, no copy is made.
pub fn replicate<M: Module>(module: &M, devices: &[Device]) -> Vec<M> {
    match devices {
        [_] | [] => vec![module.clone()],
        _ => devices
            .iter()
            .map(|d| module.clone().to_device(&d.clone().without_autodiff()))
            .collect(),
    }
}

/// The loss of the whole batch and its gradients with respect to `model`'s parameters, on
/// `model`'s device. `shard_loss(model, shard)` computes the mean loss of the batch rows
/// `shard.rows` with `model` (already forked onto `shard.device`); it runs on one thread per
/// device. With one device this is a plain backward pass on the calling thread.
pub fn loss_and_grads<M, F>(
    model: &M,
    devices: &[Device],
    batch: usize,
    shard_loss: F,
) -> Result<(f32, GradientsParams)>
where
    M: Module,
    F: Fn(&M, &Shard<'_>) -> Tensor<1> + Sync,
{
    let main = model
        .devices()
        .first()
        .cloned()
        .ok_or_else(|| Error::Config("data parallel: the model has no parameters".into()))?;
    if devices.len() <= 1 {
        let shard = Shard {
            index: 0,
            rows: 0..batch,
            device: &main,
        };
        return Ok(backward(shard_loss(model, &shard), model));
    }
    let shard_loss = &shard_loss;
    let results: Vec<std::thread::Result<(f32, GradientsParams)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = shards(batch, devices.len())
            .into_iter()
            .zip(devices)
            .enumerate()
            .filter(|(_, (rows, _))| !rows.is_empty())
            .map(|(index, (rows, device))| {
                let replica = model.clone();
                scope.spawn(move || {
                    let device = device.clone().autodiff();
                    let replica = replica.fork(&device);
                    let weight = rows.len() as f32 / batch as f32;
                    let shard = Shard {
                        index,
                        rows,
                        device: &device,
                    };
                    backward(shard_loss(&replica, &shard) * weight, &replica)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join()).collect()
    });
    let mut accumulator = GradientsAccumulator::<M>::new();
    let mut total = 0.0f32;
    for result in results {
        let (value, grads) = result.map_err(|payload| {
            let why = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Error::Backend(format!("--devices: a data-parallel worker failed: {why}"))
        })?;
        total += value;
        accumulator.accumulate(model, grads.to_device(&main, model));
    }
    Ok((total, accumulator.grads()))
}

/// The loss's value and its gradients with respect to `model`'s parameters.
fn backward<M: Module>(loss: Tensor<1>, model: &M) -> (f32, GradientsParams) {
    let value = loss.clone().into_scalar::<f32>();
    (value, GradientsParams::from_grads(loss.backward(), model))
}

#[cfg(test)]
mod tests {
    use super::shards;

    #[test]
    fn shards_cover_the_batch_evenly() {
        assert_eq!(shards(10, 3), vec![0..4, 4..7, 7..10]);
        assert_eq!(shards(4, 2), vec![0..2, 2..4]);
        assert_eq!(shards(1, 2), vec![0..1, 1..1]);
        assert_eq!(shards(5, 1), vec![0..5]);
    }
}
