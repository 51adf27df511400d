//! Weight quantization: int8 and 4-bit block formats, fake quantization for
//! quantization-aware distillation (QAD), and packed weights that stay quantized in memory.
//!
//! **Format.** Every weight of a convolution or linear layer is viewed in PyTorch layout as
//! [rows, fan_in] — rows = output channels, fan_in = in·k·k for a convolution, the input
//! features for a linear layer — and cut along fan_in into blocks of [`BLOCK`] = 32 weights of one
//! row (the last block of a row is shorter when fan_in is not a multiple of 32). Each block has
//! one f16 scale d and codes q = clamp(round_half_even(w / d), −Q, Q), w ≈ d·q, with Q = 127
//! (int8) or 7 (int4): symmetric, no zero point, as GGML's q8_0 / q4_0 blocks (q4_0 also uses
//! the code −8; here the range is symmetric). d = max|w| / Q over the block (post-training
//! quantization and the straight-through estimator), or learned (LSQ, Esser et al. 2020,
//! "Learned Step Size Quantization"). Biases and normalisation weights stay f32.
//!
//! **On disk** (safetensors, diffusers names): `<module>.weight` as I8 [rows, fan_in] (int8) or
//! U8 [rows, ⌈fan_in/2⌉] (int4: two codes per byte, low nibble first, stored as q + 8), and
//! `<module>.weight_scale` F16 [rows, blocks]; the UNet's `config.json` records the format under
//! `quantization_config` (`quant_method` "fewstep"), which diffusers refuses by name rather
//! than loading codes as weights.
//!
//! **In memory** ([`PackedWeight`]): the codes packed 4 (int8) or 8 (int4) to an i32 word on
//! the device, the scales in f16; each layer's weight is dequantized on the device when the
//! layer runs, so the f32 weight exists only transiently, one layer at a time.
//!
//! **QAD** ([`FakeQuant`], [`attach_fake_quant`]): the student's forward uses d·q instead of w,
//! the rounding passed straight through in the backward (STE), so the student learns weights
//! that survive quantization; the file written is exactly what the student computed with.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param, Reparameterization, Reparameterizer};
use burn::prelude::*;
use burn::tensor::DType;
use half::f16;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::io::PathTracker;

/// Weights per block along fan_in.
pub const BLOCK: usize = 32;
/// `quantization_config.quant_method` of fewstep's format.
pub const QUANT_METHOD: &str = "fewstep";
/// Suffix of a quantized weight's scale tensor.
pub const SCALE_SUFFIX: &str = "_scale";

/// A weight quantization format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantFormat {
    /// 8-bit codes in −127..=127, one f16 scale per 32 weights (8.5 bits per weight).
    Int8,
    /// 4-bit codes in −7..=7, one f16 scale per 32 weights (4.5 bits per weight).
    Int4,
}

impl QuantFormat {
    /// Parses `int8` / `int4` given to `flag`.
    pub fn parse(text: &str, flag: &str) -> Result<Self> {
        match text {
            "int8" => Ok(Self::Int8),
            "int4" => Ok(Self::Int4),
            other => Err(Error::Usage(format!(
                "{flag} {other}: expected int8 or int4"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Int8 => "int8",
            Self::Int4 => "int4",
        }
    }

    pub fn bits(self) -> usize {
        match self {
            Self::Int8 => 8,
            Self::Int4 => 4,
        }
    }

    /// The largest code magnitude Q.
    pub fn qmax(self) -> f32 {
        ((1u32 << (self.bits() - 1)) - 1) as f32
    }

    fn from_bits(bits: usize) -> Self {
        if bits == 8 { Self::Int8 } else { Self::Int4 }
    }
}

/// Quantization-aware training of a student (`--quantize`, `--lsq`), as a run records it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QuantizeSpec {
    pub format: QuantFormat,
    /// Learned block scales (LSQ) instead of max-abs ones.
    pub lsq: bool,
    /// Weight of the term that ties the quantized student's output to the full-precision
    /// model it starts from (`--init`), distance as the objective's: knowledge distillation from
    /// the f32 student to its quantized copy. 0 without `--init`.
    #[serde(default)]
    pub anchor: f32,
}

impl QuantizeSpec {
    /// The student `unet` with fake quantization attached.
    pub fn attach<M: Module>(&self, unet: M) -> Result<M> {
        attach_fake_quant(unet, self.format, self.lsq)
    }
}

/// A student to train from a saved UNet: a quantized one (a previous round's student) as its
/// dequantized weights — the f32 master weights were not kept — others as they are.
pub fn trainable_weights<M: Module>(unet: M) -> M {
    if is_packed(&unet) {
        unet.materialize()
    } else {
        unet
    }
}

/// `quantization_config` of a quantized model's `config.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QuantizationConfig {
    /// Always [`QUANT_METHOD`].
    pub quant_method: String,
    pub weights: QuantFormat,
    pub block_size: usize,
    pub scale_dtype: String,
}

impl QuantizationConfig {
    pub fn new(format: QuantFormat) -> Self {
        Self {
            quant_method: QUANT_METHOD.into(),
            weights: format,
            block_size: BLOCK,
            scale_dtype: "float16".into(),
        }
    }

    /// Checks a config read from a file: fewstep's method, the block size it writes.
    pub fn validate(&self) -> Result<()> {
        if self.quant_method != QUANT_METHOD {
            return Err(Error::Config(format!(
                "field `quantization_config.quant_method` = {:?}: fewstep reads only its own quantized format ({QUANT_METHOD:?})",
                self.quant_method
            )));
        }
        if self.block_size != BLOCK || self.scale_dtype != "float16" {
            return Err(Error::Config(format!(
                "field `quantization_config`: block_size {} with {} scales; fewstep's format has block_size {BLOCK} with float16 scales",
                self.block_size, self.scale_dtype
            )));
        }
        Ok(())
    }
}

/// One quantized weight on the host: codes and scales, PyTorch layout.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeight {
    pub format: QuantFormat,
    /// The weight's PyTorch shape ([out, in] or [out, in, kh, kw]).
    pub shape: Vec<usize>,
    /// [rows · fan_in] codes in −Q..=Q.
    pub codes: Vec<i8>,
    /// [rows · blocks] scales.
    pub scales: Vec<f16>,
}

/// [rows, fan_in] of a PyTorch-layout weight shape.
fn rows_fan_in(shape: &[usize]) -> (usize, usize) {
    (shape[0], shape[1..].iter().product())
}

/// The f16 scale of a block whose largest magnitude is `max_abs`: max|w| / Q rounded to f16;
/// an all-zero block gets 1 (its codes are 0 either way).
fn block_scale(max_abs: f32, format: QuantFormat) -> f16 {
    let d = f16::from_f32((max_abs / format.qmax()).min(f16::MAX.to_f32()));
    if d.to_f32() == 0.0 { f16::ONE } else { d }
}

/// The code of `w` at scale `d` — the same arithmetic as [`FakeQuant`]'s on the device.
fn code(w: f32, d: f32, qmax: f32) -> i8 {
    (w / d).round_ties_even().clamp(-qmax, qmax) as i8
}

impl QuantizedWeight {
    /// Post-training quantization with max-abs scales. `values` in PyTorch layout.
    pub fn quantize(values: &[f32], shape: &[usize], format: QuantFormat) -> Self {
        let (rows, fan_in) = rows_fan_in(shape);
        let scales: Vec<f16> = (0..rows)
            .flat_map(|r| {
                values[r * fan_in..(r + 1) * fan_in]
                    .chunks(BLOCK)
                    .map(|b| block_scale(b.iter().fold(0.0f32, |m, v| m.max(v.abs())), format))
                    .collect::<Vec<_>>()
            })
            .collect();
        Self::with_scales(values, shape, format, scales)
    }

    /// Quantization at given scales ([rows · blocks], e.g. learned ones).
    pub fn with_scales(
        values: &[f32],
        shape: &[usize],
        format: QuantFormat,
        scales: Vec<f16>,
    ) -> Self {
        let (rows, fan_in) = rows_fan_in(shape);
        let blocks = fan_in.div_ceil(BLOCK);
        assert_eq!(scales.len(), rows * blocks, "one scale per block");
        let qmax = format.qmax();
        let codes = (0..rows * fan_in)
            .map(|i| {
                let (r, c) = (i / fan_in, i % fan_in);
                code(values[i], scales[r * blocks + c / BLOCK].to_f32(), qmax)
            })
            .collect();
        Self {
            format,
            shape: shape.to_vec(),
            codes,
            scales,
        }
    }

    pub fn blocks_per_row(&self) -> usize {
        rows_fan_in(&self.shape).1.div_ceil(BLOCK)
    }

    /// d·q in PyTorch layout.
    pub fn dequantize(&self) -> Vec<f32> {
        let (_, fan_in) = rows_fan_in(&self.shape);
        let blocks = self.blocks_per_row();
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                let (r, c) = (i / fan_in, i % fan_in);
                self.scales[r * blocks + c / BLOCK].to_f32() * q as f32
            })
            .collect()
    }

    /// The codes as stored in a file: (dtype, shape, bytes).
    pub fn file_codes(&self) -> (Dtype, Vec<usize>, Vec<u8>) {
        let (rows, fan_in) = rows_fan_in(&self.shape);
        match self.format {
            QuantFormat::Int8 => (
                Dtype::I8,
                vec![rows, fan_in],
                self.codes.iter().map(|&q| q as u8).collect(),
            ),
            QuantFormat::Int4 => {
                let per_row = fan_in.div_ceil(2);
                let mut bytes = vec![0u8; rows * per_row];
                for r in 0..rows {
                    for c in 0..fan_in {
                        let nibble = (self.codes[r * fan_in + c] + 8) as u8;
                        bytes[r * per_row + c / 2] |= nibble << (4 * (c % 2));
                    }
                    // An odd row's last high nibble is the code 0 (stored 8).
                    if fan_in % 2 == 1 {
                        bytes[r * per_row + per_row - 1] |= 8 << 4;
                    }
                }
                (Dtype::U8, vec![rows, per_row], bytes)
            }
        }
    }

    /// Reads codes stored by [`file_codes`](Self::file_codes) and their scales; `shape` is the
    /// weight's PyTorch shape the model expects. Errors name what does not fit.
    pub fn from_file(
        format: QuantFormat,
        shape: &[usize],
        codes: (Dtype, &[usize], &[u8]),
        scales: (Dtype, &[usize], &[u8]),
    ) -> std::result::Result<Self, String> {
        let (rows, fan_in) = rows_fan_in(shape);
        let blocks = fan_in.div_ceil(BLOCK);
        let (want_dtype, want_shape) = match format {
            QuantFormat::Int8 => (Dtype::I8, vec![rows, fan_in]),
            QuantFormat::Int4 => (Dtype::U8, vec![rows, fan_in.div_ceil(2)]),
        };
        if codes.0 != want_dtype || codes.1 != want_shape.as_slice() {
            return Err(format!(
                "codes are {:?} {:?}; {} weights of shape {shape:?} are {want_dtype:?} {want_shape:?}",
                codes.0,
                codes.1,
                format.name()
            ));
        }
        if scales.0 != Dtype::F16 || scales.1 != [rows, blocks] {
            return Err(format!(
                "scales are {:?} {:?}; expected F16 [{rows}, {blocks}]",
                scales.0, scales.1
            ));
        }
        let qmax = format.qmax() as u8;
        let codes: Vec<i8> = match format {
            QuantFormat::Int8 => codes.2.iter().map(|&b| b as i8).collect(),
            QuantFormat::Int4 => {
                let per_row = fan_in.div_ceil(2);
                (0..rows * fan_in)
                    .map(|i| {
                        let (r, c) = (i / fan_in, i % fan_in);
                        ((codes.2[r * per_row + c / 2] >> (4 * (c % 2))) & 15) as i8 - 8
                    })
                    .collect()
            }
        };
        if let Some(bad) = codes.iter().find(|q| q.unsigned_abs() > qmax) {
            return Err(format!(
                "code {bad} outside the symmetric range ±{qmax} of {}",
                format.name()
            ));
        }
        let scales: Vec<f16> = scales
            .2
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]))
            .collect();
        if let Some(bad) = scales.iter().find(|s| !(s.to_f32() > 0.0 && s.is_finite())) {
            return Err(format!("scale {bad} is not a positive finite number"));
        }
        Ok(Self {
            format,
            shape: shape.to_vec(),
            codes,
            scales,
        })
    }

    /// The codes as device words: each row's blocks padded to 32 codes (code 0), biased by
    /// 2^(bits−1), packed 32/bits to an i32 word, lowest bits first. [rows, words per row].
    fn words(&self) -> (Vec<i32>, usize) {
        let (rows, fan_in) = rows_fan_in(&self.shape);
        let bits = self.format.bits();
        let per_word = 32 / bits;
        let padded = self.blocks_per_row() * BLOCK;
        let words_per_row = padded / per_word;
        let bias = 1i32 << (bits - 1);
        let mut words = vec![0u32; rows * words_per_row];
        for r in 0..rows {
            for c in 0..padded {
                let q = if c < fan_in {
                    self.codes[r * fan_in + c] as i32
                } else {
                    0
                };
                let u = (q + bias) as u32;
                words[r * words_per_row + c / per_word] |= u << (bits * (c % per_word));
            }
        }
        (words.into_iter().map(|w| w as i32).collect(), words_per_row)
    }
}

/// [rows, fan_in] view of a weight in burn's layout: a linear weight is [in, out] in burn, its
/// rows (PyTorch's) are the columns.
fn rows_view<const D: usize>(weight: Tensor<D>, transposed: bool) -> Tensor<2> {
    let dims = weight.dims();
    if transposed {
        weight.reshape([dims[0], dims[1]]).transpose()
    } else {
        let fan_in = dims[1..].iter().product::<usize>();
        weight.reshape([dims[0], fan_in])
    }
}

/// Inverse of [`rows_view`].
fn from_rows<const D: usize>(rows: Tensor<2>, dims: [usize; D], transposed: bool) -> Tensor<D> {
    if transposed {
        rows.transpose().reshape(dims)
    } else {
        rows.reshape(dims)
    }
}

/// Fake quantization of a weight (quantize, then dequantize) in the forward; the rounding is
/// passed straight through in the backward (STE), clipping is not (no gradient to a weight
/// clamped at ±Q·d, as LSQ's).
#[derive(Module, Debug)]
pub struct FakeQuant {
    /// Learned scales (LSQ) [rows, blocks, 1]; `None`: max-abs scales of the current weight.
    pub step: Option<Param<Tensor<3>>>,
    pub bits: usize,
    /// A linear weight ([in, out] in burn).
    pub transposed: bool,
}

impl FakeQuant {
    fn format(&self) -> QuantFormat {
        QuantFormat::from_bits(self.bits)
    }

    /// The block scales [rows, blocks, 1] used for `blocks` ([rows, blocks, 32]): learned, with
    /// LSQ's gradient scale 1/√(32·Q), else max|w|/Q (no gradient); both rounded to f16 as the
    /// file stores them.
    fn scales(&self, blocks: &Tensor<3>) -> Tensor<3> {
        let qmax = self.format().qmax();
        match &self.step {
            Some(step) => {
                let s = step.val();
                let g = 1.0 / ((BLOCK as f32) * qmax).sqrt();
                let scaled =
                    s.clone().mul_scalar(g) + (s.clone() - s.clone().mul_scalar(g)).detach();
                let rounded = to_f16_grid(s.detach());
                scaled.clone() + (rounded - scaled).detach()
            }
            None => to_f16_grid(blocks.clone().detach().abs().max_dim(2).div_scalar(qmax)),
        }
    }

    /// The blocks of `weight` ([rows, blocks, 32], zero-padded) and fan_in.
    fn blocks<const D: usize>(&self, weight: Tensor<D>) -> (Tensor<3>, usize) {
        let rows = rows_view(weight, self.transposed);
        let [r, fan_in] = rows.dims();
        let blocks = fan_in.div_ceil(BLOCK);
        let pad = blocks * BLOCK - fan_in;
        let rows = if pad > 0 {
            let zeros = Tensor::<2>::zeros([r, pad], (&rows.device(), rows.dtype()));
            Tensor::cat(vec![rows, zeros], 1)
        } else {
            rows
        };
        (rows.reshape([r, blocks, BLOCK]), fan_in)
    }
}

/// `s` rounded to the nearest f16 (what the file keeps), clamped to f16's range, zeros → 1.
/// (No gradient flows through it.)
fn to_f16_grid(s: Tensor<3>) -> Tensor<3> {
    let s = s.clamp(0.0, f16::MAX.to_f32());
    let device = s.device();
    let s = if device.supports_dtype(DType::F16) {
        s.cast(DType::F16).cast(DType::F32)
    } else {
        // A backend without f16 tensors (ndarray): round on the host.
        let dims = s.dims();
        let rounded: Vec<f32> = s
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32 scales")
            .into_iter()
            .map(|v| f16::from_f32(v).to_f32())
            .collect();
        Tensor::<3>::from_data(TensorData::new(rounded, dims), &device)
    };
    let zero = s.clone().equal_elem(0.0);
    s.mask_fill(zero, 1.0)
}

impl Reparameterization for FakeQuant {
    const NAME: &'static str = "fake_quant";

    fn apply<const D: usize>(&self, base: Tensor<D>) -> Tensor<D> {
        let dims = base.dims();
        let (blocks, fan_in) = self.blocks(base);
        let [rows, n, _] = blocks.dims();
        let scale = self.scales(&blocks);
        let qmax = self.format().qmax();
        let x = blocks / scale.clone();
        let q = (x.clone() + (x.clone().round() - x).detach()).clamp(-qmax, qmax);
        let w = (q * scale)
            .reshape([rows, n * BLOCK])
            .slice([0..rows, 0..fan_in]);
        from_rows(w, dims, self.transposed)
    }
}

/// A weight kept quantized on the device: packed codes and f16 scales, dequantized when the
/// layer runs. The parameter it is attached to holds a one-element placeholder.
#[derive(Module, Debug)]
pub struct PackedWeight {
    /// [rows, words]: codes biased by 2^(bits−1), 32/bits per i32 word, lowest bits first.
    pub codes: Param<Tensor<2, Int>>,
    /// [rows, blocks, 1], f16 (f32 on a device without f16).
    pub scales: Param<Tensor<3>>,
    pub bits: usize,
    pub fan_in: usize,
    pub transposed: bool,
    /// The weight's shape in burn's layout.
    pub dims: Vec<usize>,
}

impl PackedWeight {
    fn new(weight: &QuantizedWeight, transposed: bool, dims: Vec<usize>, device: &Device) -> Self {
        let (rows, fan_in) = rows_fan_in(&weight.shape);
        let (words, per_row) = weight.words();
        let codes = Tensor::<2, Int>::from_data(TensorData::new(words, [rows, per_row]), device);
        let blocks = weight.blocks_per_row();
        // f16 where the device holds it (a wgpu adapter without `shader-f16` does not).
        let scales = if device.supports_dtype(DType::F16) {
            Tensor::<3>::from_data(
                TensorData::new(weight.scales.clone(), [rows, blocks, 1]),
                (device, DType::F16),
            )
        } else {
            let f32s: Vec<f32> = weight.scales.iter().map(|s| s.to_f32()).collect();
            Tensor::<3>::from_data(TensorData::new(f32s, [rows, blocks, 1]), device)
        };
        Self {
            codes: Param::initialized(burn::module::ParamId::new(), codes),
            scales: Param::from_tensor(scales),
            bits: weight.format.bits(),
            fan_in,
            transposed,
            dims,
        }
    }

    /// The weight in burn's layout, decoded on the host (rows in parallel).
    fn dequantize_host(&self) -> Vec<f32> {
        use rayon::prelude::*;
        let codes = self.codes.val();
        let [rows, per_row] = codes.dims();
        let words: Vec<i32> = codes
            .into_data()
            .convert::<i32>()
            .try_to_vec::<i32>()
            .expect("i32 words");
        let scales: Vec<f32> = self
            .scales
            .val()
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("scales");
        let (bits, fan_in) = (self.bits, self.fan_in);
        let per_word = 32 / bits;
        let blocks = scales.len() / rows;
        let (mask, bias) = ((1u32 << bits) - 1, (1i32 << (bits - 1)) as f32);
        // Row r into `dst` (fan_in values): word by word, no per-element division.
        let decode_row = |r: usize, dst: &mut [f32]| {
            let row = &words[r * per_row..(r + 1) * per_row];
            let scales = &scales[r * blocks..(r + 1) * blocks];
            for (i, &word) in row.iter().enumerate() {
                let first = i * per_word;
                let scale = scales[first / BLOCK];
                let last = (first + per_word).min(fan_in);
                for (k, out) in dst[first.min(fan_in)..last].iter_mut().enumerate() {
                    let u = ((word as u32) >> (bits * k)) & mask;
                    *out = scale * (u as f32 - bias);
                }
            }
        };
        let mut w = vec![0.0f32; rows * fan_in];
        if self.transposed {
            // [in, out]: column r of the result is PyTorch's row r.
            let mut t = vec![0.0f32; rows * fan_in];
            t.par_chunks_mut(fan_in)
                .enumerate()
                .for_each(|(r, dst)| decode_row(r, dst));
            for r in 0..rows {
                for c in 0..fan_in {
                    w[c * rows + r] = t[r * fan_in + c];
                }
            }
        } else {
            w.par_chunks_mut(fan_in)
                .enumerate()
                .for_each(|(r, dst)| decode_row(r, dst));
        }
        w
    }

    /// The codes in −Q..=Q as floats, [rows, blocks · 32].
    fn codes_f32(&self) -> Tensor<2> {
        let words = self.codes.val();
        let [rows, per_row] = words.dims();
        let per_word = 32 / self.bits;
        let mask = (1i64 << self.bits) - 1;
        let parts: Vec<Tensor<2, Int>> = (0..per_word)
            .map(|k| {
                words
                    .clone()
                    .bitwise_right_shift_scalar((k * self.bits) as i64)
                    .bitwise_and_scalar(mask)
            })
            .collect();
        Tensor::stack::<3>(parts, 2)
            .reshape([rows, per_row * per_word])
            .float()
            .sub_scalar((1i64 << (self.bits - 1)) as f32)
    }
}

impl Reparameterization for PackedWeight {
    const NAME: &'static str = "packed";

    fn apply<const D: usize>(&self, placeholder: Tensor<D>) -> Tensor<D> {
        let device = placeholder.device();
        if crate::backend::is_flex(&device) && placeholder.dtype() == DType::F32 {
            // One pass over the packed words on the CPU: a dozen tensor ops per layer cost
            // more than the layer itself at batch 1.
            let dims: [usize; D] = self.dims.clone().try_into().expect("the weight's rank");
            return Tensor::<D>::from_data(TensorData::new(self.dequantize_host(), dims), &device);
        }
        self.dequantize_tensor_ops(placeholder)
    }
}

impl PackedWeight {
    /// The weight dequantized by tensor ops on its device (wgpu, LibTorch, f16 anywhere).
    fn dequantize_tensor_ops<const D: usize>(&self, placeholder: Tensor<D>) -> Tensor<D> {
        let q = self.codes_f32();
        let [rows, padded] = q.dims();
        let scales = self.scales.val().cast(DType::F32);
        let w = (q.reshape([rows, padded / BLOCK, BLOCK]) * scales)
            .reshape([rows, padded])
            .slice([0..rows, 0..self.fan_in]);
        let dims: [usize; D] = self.dims.clone().try_into().expect("the weight's rank");
        // The placeholder carries the precision the model computes in (f16 after a cast).
        let w = if placeholder.dtype() == DType::F32 {
            w
        } else {
            w.cast(placeholder.dtype())
        };
        from_rows(w, dims, self.transposed)
    }
}

/// A quantizable weight: a convolution's or linear layer's `weight`, found by a walk over the
/// module. Keyed by burn's raw path (as [`Reparameterizer`]s see it).
#[derive(Debug, Clone)]
struct Target {
    /// The diffusers (PyTorch) name.
    torch_name: String,
    transposed: bool,
    /// The weight's PyTorch shape.
    shape: Vec<usize>,
}

#[derive(Default)]
struct Targets {
    raw: Vec<String>,
    torch: PathTracker,
    found: HashMap<String, Target>,
}

impl ModuleVisitor for Targets {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.raw.push(name.to_string());
        self.torch.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.raw.pop();
        self.torch.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let container = self.torch.container().to_string();
        let container = container.as_str();
        let linear = container == "Struct:Linear" && D == 2;
        let conv = matches!(container, "Struct:Conv2d" | "Struct:ConvTranspose2d") && D == 4;
        if (linear || conv) && self.raw.last().is_some_and(|n| n == "weight") {
            let (torch_name, transposed) = self.torch.torch_name();
            let shape = torch_shape(&param.lazy_shape().dims::<D>(), transposed);
            self.found.insert(
                self.raw.join("."),
                Target {
                    torch_name,
                    transposed,
                    shape,
                },
            );
        }
    }
}

fn targets<M: Module>(module: &M) -> HashMap<String, Target> {
    let mut t = Targets::default();
    module.visit(&mut t);
    t.found
}

struct AttachFakeQuant {
    format: QuantFormat,
    lsq: bool,
    targets: HashMap<String, Target>,
    attached: usize,
}

impl Reparameterizer for &mut AttachFakeQuant {
    type Reparam = FakeQuant;

    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<FakeQuant>) {
        let Some(target) = self.targets.get(path) else {
            return (param, None);
        };
        let mut fake = FakeQuant {
            step: None,
            bits: self.format.bits(),
            transposed: target.transposed,
        };
        if self.lsq {
            // Learned scales start at the max-abs ones.
            let (blocks, _) = fake.blocks(param.val().detach());
            fake.step = Some(Param::from_tensor(fake.scales(&blocks)));
        }
        self.attached += 1;
        (param, Some(fake))
    }
}

/// Attaches fake quantization in `format` to every convolution and linear weight of `module`
/// (with learned LSQ scales when `lsq`). Errors when the module has no such weight.
pub fn attach_fake_quant<M: Module>(module: M, format: QuantFormat, lsq: bool) -> Result<M> {
    let mut attach = AttachFakeQuant {
        format,
        lsq,
        targets: targets(&module),
        attached: 0,
    };
    let module = module.apply_reparameterization(&mut attach);
    if attach.attached == 0 {
        return Err(Error::Usage(
            "--quantize: the model has no convolution or linear weight to quantize".into(),
        ));
    }
    Ok(module)
}

/// Collects, by diffusers name, the quantized form of every weight of a module: fake-quantized
/// ones at the scales their forward uses (learned ones are visited after their weight, as
/// `<weight>.fake_quant.step`), plain ones with max-abs scales. (A visitor sees a parameter
/// without its reparameterization, only the reparameterization's own parameters after it.)
struct Quantize {
    format: QuantFormat,
    targets: HashMap<String, Target>,
    raw: Vec<String>,
    /// Raw path → (diffusers name, PyTorch-layout values, PyTorch shape).
    values: HashMap<String, (String, Vec<f32>, Vec<usize>)>,
    out: BTreeMap<String, QuantizedWeight>,
    packed: bool,
}

impl ModuleVisitor for Quantize {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.raw.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.raw.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let raw = self.raw.join(".");
        if let Some(target) = self.targets.get(&raw) {
            let base = param.val();
            let shape = torch_shape(&base.dims(), target.transposed);
            let rows = rows_view(base, target.transposed);
            let values: Vec<f32> = rows
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .expect("f32");
            self.out.insert(
                target.torch_name.clone(),
                QuantizedWeight::quantize(&values, &shape, self.format),
            );
            self.values
                .insert(raw, (target.torch_name.clone(), values, shape));
        } else if let Some(weight) = raw.strip_suffix(&format!(".{}.step", FakeQuant::NAME))
            && let Some((name, values, shape)) = self.values.get(weight)
        {
            let step = param.val();
            let dims = step.dims();
            let scales: Vec<f16> = to_f16_grid(step.reshape([dims[0], dims[1], 1]))
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .expect("f32 scales")
                .into_iter()
                .map(f16::from_f32)
                .collect();
            self.out.insert(
                name.clone(),
                QuantizedWeight::with_scales(values, shape, self.format, scales),
            );
        }
    }
    fn visit_int<const D: usize>(&mut self, _: &Param<Tensor<D, Int>>) {
        self.packed |= self.raw.iter().any(|n| n == PackedWeight::NAME);
    }
}

fn torch_shape(burn_dims: &[usize], transposed: bool) -> Vec<usize> {
    if transposed {
        vec![burn_dims[1], burn_dims[0]]
    } else {
        burn_dims.to_vec()
    }
}

/// The quantized weights of `module` by diffusers name, in `format` (the format its fake
/// quantization was attached with, if any). Errors on a model loaded quantized.
pub fn quantized_weights<M: Module>(
    module: &M,
    format: QuantFormat,
) -> Result<BTreeMap<String, QuantizedWeight>> {
    let mut q = Quantize {
        format,
        targets: targets(module),
        raw: Vec::new(),
        values: HashMap::new(),
        out: BTreeMap::new(),
        packed: false,
    };
    module.visit(&mut q);
    if q.packed {
        return Err(Error::Usage(
            "the model is already quantized (its folder's config has a quantization_config)".into(),
        ));
    }
    Ok(q.out)
}

/// The file tensors of `module`'s weights quantized in `format` (codes under the weight's name,
/// scales beside them), for [`crate::io::weights_to_bytes_stored`].
pub fn stored_tensors<M: Module>(
    module: &M,
    format: QuantFormat,
) -> Result<BTreeMap<String, crate::io::RawTensor>> {
    let mut out = BTreeMap::new();
    for (name, weight) in quantized_weights(module, format)? {
        let (dtype, shape, bytes) = weight.file_codes();
        out.insert(
            format!("{name}{SCALE_SUFFIX}"),
            crate::io::RawTensor {
                dtype: Dtype::F16,
                shape: vec![weight.shape[0], weight.blocks_per_row()],
                bytes: weight.scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
            },
        );
        out.insert(
            name,
            crate::io::RawTensor {
                dtype,
                shape,
                bytes,
            },
        );
    }
    Ok(out)
}

/// Writes `module`'s weights with its convolution and linear weights quantized in `format`.
pub fn save_quantized<M: Module>(module: &M, format: QuantFormat, path: &Path) -> Result<()> {
    let stored = stored_tensors(module, format)?;
    crate::io::write_atomic(path, &crate::io::weights_to_bytes_stored(module, &stored)?)
}

/// Whether `module` holds packed (already quantized) weights.
pub fn is_packed<M: Module>(module: &M) -> bool {
    // The codes are the only integer parameters of a model.
    struct Find(bool);
    impl ModuleVisitor for Find {
        fn visit_int<const D: usize>(&mut self, _: &Param<Tensor<D, Int>>) {
            self.0 = true;
        }
    }
    let mut f = Find(false);
    module.visit(&mut f);
    f.0
}

struct AttachPacked<'a> {
    targets: HashMap<String, Target>,
    weights: &'a HashMap<String, QuantizedWeight>,
}

impl Reparameterizer for &mut AttachPacked<'_> {
    type Reparam = PackedWeight;

    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<PackedWeight>) {
        let Some(weight) = self
            .targets
            .get(path)
            .and_then(|t| self.weights.get(&t.torch_name).map(|w| (t, w)))
        else {
            return (param, None);
        };
        let (target, weight) = weight;
        let device = param.lazy_device();
        let dims = param.lazy_shape().dims::<D>().to_vec();
        let packed = PackedWeight::new(weight, target.transposed, dims, &device);
        // The lazily initialised weight is dropped unmaterialised: only the packed form is
        // ever allocated.
        let placeholder = Tensor::<D>::zeros([1; D], &device);
        (Param::initialized(param.id, placeholder), Some(packed))
    }
}

/// Reads the quantized weights of a safetensors file in `format` (the names the model expects
/// as `expected`: diffusers name → PyTorch shape); every quantizable weight must be quantized,
/// with its scale beside it.
fn read_quantized(
    path: &Path,
    format: QuantFormat,
    expected: &BTreeMap<String, Vec<usize>>,
) -> Result<HashMap<String, QuantizedWeight>> {
    let bytes = crate::io::map_file(path)?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::file(path, format!("corrupt or truncated safetensors file ({e})")))?;
    let mut out = HashMap::new();
    for (name, shape) in expected {
        let scale_name = format!("{name}{SCALE_SUFFIX}");
        let (Ok(codes), Ok(scales)) = (file.tensor(name), file.tensor(&scale_name)) else {
            return Err(Error::file(
                path,
                format!(
                    "missing `{name}` or `{scale_name}`: the config says the weights are {} quantized",
                    format.name()
                ),
            ));
        };
        let weight = QuantizedWeight::from_file(
            format,
            shape,
            (codes.dtype(), codes.shape(), codes.data()),
            (scales.dtype(), scales.shape(), scales.data()),
        )
        .map_err(|why| Error::file(path, format!("tensor `{name}`: {why}")))?;
        out.insert(name.clone(), weight);
    }
    Ok(out)
}

/// Loads a quantized model: the packed weights from `path` attached to `module` (fresh from its
/// config, weights not yet materialised), every other parameter through `load_rest` (the f32
/// loader, told which names the packed weights took).
pub fn load_quantized<M: Module>(
    module: M,
    path: &Path,
    format: QuantFormat,
    load_rest: impl FnOnce(M, &std::collections::BTreeSet<String>) -> Result<M>,
) -> Result<M> {
    let targets = targets(&module);
    let expected: BTreeMap<String, Vec<usize>> = targets
        .values()
        .map(|t| (t.torch_name.clone(), t.shape.clone()))
        .collect();
    let weights = read_quantized(path, format, &expected)?;
    let mut attach = AttachPacked {
        targets,
        weights: &weights,
    };
    let module = module.apply_reparameterization(&mut attach);
    let mut taken: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    for name in weights.keys() {
        taken.insert(name.clone());
        taken.insert(format!("{name}{SCALE_SUFFIX}"));
    }
    load_rest(module, &taken)
}

/// Bytes the module's parameters occupy on the device (packed codes and scales included, the
/// one-element placeholders too).
pub fn weight_bytes<M: Module>(module: &M) -> usize {
    struct Bytes(usize);
    impl ModuleVisitor for Bytes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let t = param.base();
            self.0 += t.shape().num_elements() * t.dtype().size();
        }
        fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<D, Int>>) {
            let t = param.val();
            self.0 += t.shape().num_elements() * t.dtype().size();
        }
    }
    let mut b = Bytes(0);
    module.visit(&mut b);
    b.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host decoder (flex) and the tensor-op one (other devices) give the same weight, in
    /// both layouts and formats.
    #[test]
    fn host_and_tensor_op_dequantization_agree() {
        let device = crate::backend::cpu_device().expect("a CPU backend");
        for format in [QuantFormat::Int8, QuantFormat::Int4] {
            for (shape, transposed) in [(vec![6usize, 3, 3, 3], false), (vec![5, 70], true)] {
                let n: usize = shape.iter().product();
                let values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 0.1).collect();
                let q = QuantizedWeight::quantize(&values, &shape, format);
                let dims = if transposed {
                    vec![shape[1], shape[0]]
                } else {
                    shape.clone()
                };
                let packed = PackedWeight::new(&q, transposed, dims.clone(), &device);
                let host = packed.dequantize_host();
                let ops: Vec<f32> = match dims.len() {
                    2 => packed.dequantize_tensor_ops(Tensor::<2>::zeros([1, 1], &device)),
                    _ => packed
                        .dequantize_tensor_ops(Tensor::<4>::zeros([1, 1, 1, 1], &device))
                        .reshape([dims[0], n / dims[0]]),
                }
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
                assert_eq!(host, ops, "{format:?} {shape:?}");
                // Both are the host form's d·q, in burn's layout.
                let want = q.dequantize();
                let want: Vec<f32> = if transposed {
                    (0..n)
                        .map(|i| want[(i % shape[0]) * shape[1] + i / shape[0]])
                        .collect()
                } else {
                    want
                };
                assert_eq!(host, want);
            }
        }
    }
}
