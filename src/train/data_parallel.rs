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
//! Across processes and machines (`--nodes`), the same split continues one level up: each
//! process takes a contiguous share of the batch rows, splits it over its own devices, and the
//! processes' gradient sums are all-reduced ([`crate::distributed`]).
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

/// One copy of a frozen module per device (`main` alone when `devices` is empty) on the
/// device's autodiff side, its parameters out of the gradient: a network inside a loss that
/// gradients pass through to its input but do not train (`copies[shard.index]`).
pub fn frozen_through<M: Module>(module: &M, main: &Device, devices: &[Device]) -> Vec<M> {
    let on = if devices.is_empty() {
        std::slice::from_ref(main)
    } else {
        devices
    };
    on.iter()
        .map(|d| module.clone().to_device(&d.clone().autodiff()).no_grad())
        .collect()
}

/// The loss of the whole batch and its gradients with respect to `model`'s parameters, on
/// `model`'s device. `shard_loss(model, shard)` computes the mean loss of the batch rows
/// `shard.rows` with `model` (already forked onto `shard.device`); it runs on one thread per
/// device. With one device this is a plain backward pass on the calling thread.
///
/// In a multi-process run ([`crate::distributed`]) every process holds the whole batch (the
/// same draws everywhere), computes the gradients of its own contiguous share of the rows, and
/// the shares are summed across processes: each process gets the whole batch's loss and
/// gradients, and applies the same optimiser step to an identical replica.
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
    let (rank, world) = crate::distributed::rank_and_world();
    let rows = shards(batch, world).swap_remove(rank);
    let (loss, grads) = process_loss_and_grads(model, &main, devices, batch, rows, &shard_loss)?;
    if world == 1 {
        return Ok((loss, grads));
    }
    all_reduce_grads(model, &main, loss, grads)
}

/// This process's part of [`loss_and_grads`]: the rows `rows` of a batch of `batch`, over
/// `devices`, each shard's loss weighted by its share of the whole batch.
fn process_loss_and_grads<M, F>(
    model: &M,
    main: &Device,
    devices: &[Device],
    batch: usize,
    rows: Range<usize>,
    shard_loss: &F,
) -> Result<(f32, GradientsParams)>
where
    M: Module,
    F: Fn(&M, &Shard<'_>) -> Tensor<1> + Sync,
{
    if rows.is_empty() {
        // More processes than rows: this one contributes nothing to the sum.
        return Ok((0.0, GradientsParams::new()));
    }
    if devices.len() <= 1 {
        let whole = rows.len() == batch;
        let weight = rows.len() as f32 / batch as f32;
        let shard = Shard {
            index: 0,
            rows,
            device: main,
        };
        let loss = shard_loss(model, &shard);
        let loss = if whole { loss } else { loss * weight };
        return Ok(backward(loss, model));
    }
    let results: Vec<std::thread::Result<(f32, GradientsParams)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = shards(rows.len(), devices.len())
            .into_iter()
            .map(|r| rows.start + r.start..rows.start + r.end)
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
        accumulator.accumulate(model, grads.to_device(main, model));
    }
    Ok((total, accumulator.grads()))
}

/// Sums `loss` and `grads` over the processes of the run: the gradients go to host memory in the
/// model's parameter order (one presence flag each, so a parameter without a gradient on some
/// process still lines up), through one all-reduce, and back. Before the first exchange the
/// replicas are checked to be identical.
fn all_reduce_grads<M: Module>(
    model: &M,
    main: &Device,
    loss: f32,
    mut grads: GradientsParams,
) -> Result<(f32, GradientsParams)> {
    let needs_check = crate::distributed::with_group(|g| !g.replicas_checked()).unwrap_or(false);
    let mut flat = Flatten {
        grads: &mut grads,
        present: Vec::new(),
        values: Vec::new(),
        shapes: Vec::new(),
        device: None,
        fingerprint: needs_check.then_some([0.0f64; 3]),
    };
    model.visit(&mut flat);
    let Flatten {
        present,
        values,
        shapes,
        device,
        fingerprint,
        ..
    } = flat;
    let mut buffer = Vec::with_capacity(1 + present.len() + values.len());
    buffer.push(loss);
    buffer.extend(&present);
    buffer.extend(&values);
    crate::distributed::with_group(|g| {
        if let Some(f) = fingerprint {
            g.check_replicas(&f.map(|x| x as f32))?;
        }
        g.all_reduce_sum(&mut buffer)
    })
    .unwrap_or(Ok(()))?;
    let device = device.unwrap_or_else(|| main.clone().without_autodiff());
    let mut rebuild = Rebuild {
        grads: GradientsParams::new(),
        present: &buffer[1..1 + present.len()],
        values: &buffer[1 + present.len()..],
        shapes: &shapes,
        index: 0,
        offset: 0,
        device: &device,
    };
    model.visit(&mut rebuild);
    Ok((buffer[0], rebuild.grads))
}

/// Moves the gradients of a module's trainable parameters into one host buffer (zeros and a 0
/// flag where a parameter has none), and optionally sums the parameters themselves (count, sum,
/// sum of squares) as a fingerprint of the replica.
struct Flatten<'a> {
    grads: &'a mut GradientsParams,
    present: Vec<f32>,
    values: Vec<f32>,
    shapes: Vec<Vec<usize>>,
    device: Option<Device>,
    fingerprint: Option<[f64; 3]>,
}

impl burn::module::ModuleVisitor for Flatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        if !param.is_require_grad() {
            return;
        }
        let shape = param.lazy_shape().dims::<D>().to_vec();
        let len: usize = shape.iter().product();
        match self.grads.remove::<D>(param.id) {
            Some(g) => {
                self.device.get_or_insert_with(|| g.device());
                self.present.push(1.0);
                let data = g.into_data().convert::<f32>();
                self.values
                    .extend(data.as_slice::<f32>().expect("converted to f32"));
            }
            None => {
                self.present.push(0.0);
                self.values.extend(std::iter::repeat_n(0.0, len));
            }
        }
        if let Some(f) = &mut self.fingerprint {
            let data = param.val().into_data().convert::<f32>();
            for &x in data.as_slice::<f32>().expect("converted to f32") {
                f[0] += 1.0;
                f[1] += x as f64;
                f[2] += (x as f64) * (x as f64);
            }
        }
        self.shapes.push(shape);
    }
}

/// The inverse of [`Flatten`]: registers the summed gradients of the parameters some process
/// had a gradient for.
struct Rebuild<'a> {
    grads: GradientsParams,
    present: &'a [f32],
    values: &'a [f32],
    shapes: &'a [Vec<usize>],
    index: usize,
    offset: usize,
    device: &'a Device,
}

impl burn::module::ModuleVisitor for Rebuild<'_> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        if !param.is_require_grad() {
            return;
        }
        let shape = &self.shapes[self.index];
        let len: usize = shape.iter().product();
        if self.present[self.index] > 0.0 {
            let data = burn::tensor::TensorData::new(
                self.values[self.offset..self.offset + len].to_vec(),
                shape.clone(),
            );
            self.grads
                .register::<D>(param.id, Tensor::from_data(data, self.device));
        }
        self.index += 1;
        self.offset += len;
    }
}

/// The gradients of `module`'s parameters, moved out of `grads`: what one optimiser steps when
/// one backward pass trained several modules with optimisers of their own.
pub fn take_grads<M: Module>(grads: &mut GradientsParams, module: &M) -> GradientsParams {
    let mut take = TakeGrads {
        from: grads,
        taken: GradientsParams::new(),
    };
    module.visit(&mut take);
    take.taken
}

struct TakeGrads<'a> {
    from: &'a mut GradientsParams,
    taken: GradientsParams,
}

impl burn::module::ModuleVisitor for TakeGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        if let Some(g) = self.from.remove::<D>(param.id) {
            self.taken.register::<D>(param.id, g);
        }
    }
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
