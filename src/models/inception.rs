//! The FID Inception-v3 (pytorch-fid's `FIDInceptionV3`, the network of
//! `pt_inception-2015-12-05-6726825d.pth`) up to the 2048-d pool3 features, inference only.
//!
//! Inputs in [0, 1] are resized bilinearly to 299×299 (`align_corners = False`), scaled to
//! [-1, 1] and run through torchvision's Inception-v3 stem and mixed blocks with the FID
//! variants' differences: average pools that do not count padding (`FIDInceptionA`, `C`, `E_1`)
//! and a max pool in the last block (`FIDInceptionE_2`). Every `BasicConv2d` (convolution without
//! bias, batch norm with ε = 0.001, ReLU) has its batch norm folded into the convolution when
//! the weights are loaded.
//!
//! Weights come from the user's `.pth` (read by burn's pickle-free PyTorch reader: tensors as
//! data, no Python objects built or code run) or a safetensors conversion with the same names;
//! fewstep never downloads them.

use std::collections::HashMap;
use std::path::Path;

use burn::prelude::*;
use burn::tensor::module::{adaptive_avg_pool2d, avg_pool2d, interpolate, max_pool2d};

use crate::backend::conv2d;
use burn::tensor::ops::{
    AvgPoolOptions, ConvOptions, InterpolateMode, InterpolateOptions, MaxPoolOptions,
};

use crate::error::{Error, Result};
use crate::io::{self, HostTensor};

/// The file pytorch-fid downloads (fewstep reads a local copy).
pub const FID_WEIGHTS_FILE: &str = "pt_inception-2015-12-05-6726825d.pth";
/// Where it comes from.
pub const FID_WEIGHTS_URL: &str = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth";
/// Feature dimension (pool3).
pub const FEATURES: usize = 2048;

/// Convolution + folded batch norm + ReLU.
#[derive(Debug, Clone)]
struct BasicConv {
    weight: Tensor<4>,
    bias: Tensor<1>,
    stride: usize,
    padding: [usize; 2],
}

impl BasicConv {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let options = ConvOptions::new([self.stride; 2], self.padding, [1, 1], 1);
        conv2d(x, self.weight.clone(), Some(self.bias.clone()), options).clamp_min(0.0)
    }
}

/// Reads `BasicConv2d` tensors by name (from a file's tensors, or from the parity fixture's
/// formula), checking shapes, and folds the batch norm.
struct Builder<'a> {
    tensors: Option<&'a HashMap<String, HostTensor>>,
    device: &'a Device,
}

impl Builder<'_> {
    fn get(
        &self,
        name: &str,
        shape: &[usize],
    ) -> std::result::Result<std::borrow::Cow<'_, HostTensor>, String> {
        let Some(tensors) = self.tensors else {
            return Ok(std::borrow::Cow::Owned(formula(name, shape)));
        };
        let t = tensors
            .get(name)
            .ok_or_else(|| format!("missing tensor `{name}` (shape {shape:?})"))?;
        if t.shape != shape {
            return Err(format!(
                "tensor `{name}` has shape {:?}, expected {shape:?}",
                t.shape
            ));
        }
        Ok(std::borrow::Cow::Borrowed(t))
    }

    /// `name`: `Mixed_5b.branch1x1` etc.; kernel [kh, kw].
    fn conv(
        &self,
        name: &str,
        c_in: usize,
        c_out: usize,
        kernel: [usize; 2],
        stride: usize,
        padding: [usize; 2],
    ) -> std::result::Result<BasicConv, String> {
        let w = self.get(
            &format!("{name}.conv.weight"),
            &[c_out, c_in, kernel[0], kernel[1]],
        )?;
        let gamma = self.get(&format!("{name}.bn.weight"), &[c_out])?;
        let beta = self.get(&format!("{name}.bn.bias"), &[c_out])?;
        let mean = self.get(&format!("{name}.bn.running_mean"), &[c_out])?;
        let var = self.get(&format!("{name}.bn.running_var"), &[c_out])?;
        let per = c_in * kernel[0] * kernel[1];
        let mut weight = w.data.clone();
        let mut bias = vec![0f32; c_out];
        for o in 0..c_out {
            // BatchNorm2d(eps = 0.001) folded: w' = w·γ/√(σ² + ε), b' = β − μ·γ/√(σ² + ε).
            let scale = (gamma.data[o] as f64 / (var.data[o] as f64 + 1e-3).sqrt()) as f32;
            for v in &mut weight[o * per..(o + 1) * per] {
                *v *= scale;
            }
            bias[o] = beta.data[o] - mean.data[o] * scale;
        }
        Ok(BasicConv {
            weight: Tensor::<1>::from_floats(weight.as_slice(), self.device)
                .reshape([c_out, c_in, kernel[0], kernel[1]]),
            bias: Tensor::<1>::from_floats(bias.as_slice(), self.device),
            stride,
            padding,
        })
    }
}

fn avg_pool_3x3(x: Tensor<4>) -> Tensor<4> {
    avg_pool2d(
        x,
        AvgPoolOptions::new([3, 3])
            .with_stride([1, 1])
            .with_padding([1, 1])
            .with_count_include_pad(false),
    )
}

fn max_pool_3x3_s2(x: Tensor<4>) -> Tensor<4> {
    max_pool2d(x, MaxPoolOptions::new([3, 3]).with_stride([2, 2]))
}

/// `FIDInceptionA`.
#[derive(Debug, Clone)]
struct BlockA {
    b1: BasicConv,
    b5: [BasicConv; 2],
    b3: [BasicConv; 3],
    pool: BasicConv,
}

impl BlockA {
    fn new(b: &Builder, name: &str, c: usize, pool: usize) -> std::result::Result<Self, String> {
        let n = |s: &str| format!("{name}.{s}");
        Ok(BlockA {
            b1: b.conv(&n("branch1x1"), c, 64, [1, 1], 1, [0, 0])?,
            b5: [
                b.conv(&n("branch5x5_1"), c, 48, [1, 1], 1, [0, 0])?,
                b.conv(&n("branch5x5_2"), 48, 64, [5, 5], 1, [2, 2])?,
            ],
            b3: [
                b.conv(&n("branch3x3dbl_1"), c, 64, [1, 1], 1, [0, 0])?,
                b.conv(&n("branch3x3dbl_2"), 64, 96, [3, 3], 1, [1, 1])?,
                b.conv(&n("branch3x3dbl_3"), 96, 96, [3, 3], 1, [1, 1])?,
            ],
            pool: b.conv(&n("branch_pool"), c, pool, [1, 1], 1, [0, 0])?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b1 = self.b1.forward(x.clone());
        let b5 = self.b5[1].forward(self.b5[0].forward(x.clone()));
        let b3 = self.b3[2].forward(self.b3[1].forward(self.b3[0].forward(x.clone())));
        let pool = self.pool.forward(avg_pool_3x3(x));
        Tensor::cat(vec![b1, b5, b3, pool], 1)
    }
}

/// `InceptionB` (Mixed_6a).
#[derive(Debug, Clone)]
struct BlockB {
    b3: BasicConv,
    dbl: [BasicConv; 3],
}

impl BlockB {
    fn new(b: &Builder, name: &str, c: usize) -> std::result::Result<Self, String> {
        let n = |s: &str| format!("{name}.{s}");
        Ok(BlockB {
            b3: b.conv(&n("branch3x3"), c, 384, [3, 3], 2, [0, 0])?,
            dbl: [
                b.conv(&n("branch3x3dbl_1"), c, 64, [1, 1], 1, [0, 0])?,
                b.conv(&n("branch3x3dbl_2"), 64, 96, [3, 3], 1, [1, 1])?,
                b.conv(&n("branch3x3dbl_3"), 96, 96, [3, 3], 2, [0, 0])?,
            ],
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b3 = self.b3.forward(x.clone());
        let dbl = self.dbl[2].forward(self.dbl[1].forward(self.dbl[0].forward(x.clone())));
        Tensor::cat(vec![b3, dbl, max_pool_3x3_s2(x)], 1)
    }
}

/// `FIDInceptionC`.
#[derive(Debug, Clone)]
struct BlockC {
    b1: BasicConv,
    b7: [BasicConv; 3],
    dbl: [BasicConv; 5],
    pool: BasicConv,
}

impl BlockC {
    fn new(b: &Builder, name: &str, c7: usize) -> std::result::Result<Self, String> {
        let n = |s: &str| format!("{name}.{s}");
        let (c, row, col) = (768, ([1, 7], [0, 3]), ([7, 1], [3, 0]));
        Ok(BlockC {
            b1: b.conv(&n("branch1x1"), c, 192, [1, 1], 1, [0, 0])?,
            b7: [
                b.conv(&n("branch7x7_1"), c, c7, [1, 1], 1, [0, 0])?,
                b.conv(&n("branch7x7_2"), c7, c7, row.0, 1, row.1)?,
                b.conv(&n("branch7x7_3"), c7, 192, col.0, 1, col.1)?,
            ],
            dbl: [
                b.conv(&n("branch7x7dbl_1"), c, c7, [1, 1], 1, [0, 0])?,
                b.conv(&n("branch7x7dbl_2"), c7, c7, col.0, 1, col.1)?,
                b.conv(&n("branch7x7dbl_3"), c7, c7, row.0, 1, row.1)?,
                b.conv(&n("branch7x7dbl_4"), c7, c7, col.0, 1, col.1)?,
                b.conv(&n("branch7x7dbl_5"), c7, 192, row.0, 1, row.1)?,
            ],
            pool: b.conv(&n("branch_pool"), c, 192, [1, 1], 1, [0, 0])?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b1 = self.b1.forward(x.clone());
        let b7 = self.b7.iter().fold(x.clone(), |h, c| c.forward(h));
        let dbl = self.dbl.iter().fold(x.clone(), |h, c| c.forward(h));
        let pool = self.pool.forward(avg_pool_3x3(x));
        Tensor::cat(vec![b1, b7, dbl, pool], 1)
    }
}

/// `InceptionD` (Mixed_7a).
#[derive(Debug, Clone)]
struct BlockD {
    b3: [BasicConv; 2],
    b7: [BasicConv; 4],
}

impl BlockD {
    fn new(b: &Builder, name: &str) -> std::result::Result<Self, String> {
        let n = |s: &str| format!("{name}.{s}");
        let c = 768;
        Ok(BlockD {
            b3: [
                b.conv(&n("branch3x3_1"), c, 192, [1, 1], 1, [0, 0])?,
                b.conv(&n("branch3x3_2"), 192, 320, [3, 3], 2, [0, 0])?,
            ],
            b7: [
                b.conv(&n("branch7x7x3_1"), c, 192, [1, 1], 1, [0, 0])?,
                b.conv(&n("branch7x7x3_2"), 192, 192, [1, 7], 1, [0, 3])?,
                b.conv(&n("branch7x7x3_3"), 192, 192, [7, 1], 1, [3, 0])?,
                b.conv(&n("branch7x7x3_4"), 192, 192, [3, 3], 2, [0, 0])?,
            ],
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b3 = self.b3.iter().fold(x.clone(), |h, c| c.forward(h));
        let b7 = self.b7.iter().fold(x.clone(), |h, c| c.forward(h));
        Tensor::cat(vec![b3, b7, max_pool_3x3_s2(x)], 1)
    }
}

/// `FIDInceptionE_1` (average pool) or `FIDInceptionE_2` (max pool).
#[derive(Debug, Clone)]
struct BlockE {
    b1: BasicConv,
    b3: BasicConv,
    b3a: BasicConv,
    b3b: BasicConv,
    dbl1: BasicConv,
    dbl2: BasicConv,
    dbl3a: BasicConv,
    dbl3b: BasicConv,
    pool: BasicConv,
    max_pool: bool,
}

impl BlockE {
    fn new(b: &Builder, name: &str, c: usize, max_pool: bool) -> std::result::Result<Self, String> {
        let n = |s: &str| format!("{name}.{s}");
        Ok(BlockE {
            b1: b.conv(&n("branch1x1"), c, 320, [1, 1], 1, [0, 0])?,
            b3: b.conv(&n("branch3x3_1"), c, 384, [1, 1], 1, [0, 0])?,
            b3a: b.conv(&n("branch3x3_2a"), 384, 384, [1, 3], 1, [0, 1])?,
            b3b: b.conv(&n("branch3x3_2b"), 384, 384, [3, 1], 1, [1, 0])?,
            dbl1: b.conv(&n("branch3x3dbl_1"), c, 448, [1, 1], 1, [0, 0])?,
            dbl2: b.conv(&n("branch3x3dbl_2"), 448, 384, [3, 3], 1, [1, 1])?,
            dbl3a: b.conv(&n("branch3x3dbl_3a"), 384, 384, [1, 3], 1, [0, 1])?,
            dbl3b: b.conv(&n("branch3x3dbl_3b"), 384, 384, [3, 1], 1, [1, 0])?,
            pool: b.conv(&n("branch_pool"), c, 192, [1, 1], 1, [0, 0])?,
            max_pool,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b1 = self.b1.forward(x.clone());
        let h = self.b3.forward(x.clone());
        let b3 = Tensor::cat(vec![self.b3a.forward(h.clone()), self.b3b.forward(h)], 1);
        let h = self.dbl2.forward(self.dbl1.forward(x.clone()));
        let dbl = Tensor::cat(
            vec![self.dbl3a.forward(h.clone()), self.dbl3b.forward(h)],
            1,
        );
        let pooled = if self.max_pool {
            max_pool2d(
                x,
                MaxPoolOptions::new([3, 3])
                    .with_stride([1, 1])
                    .with_padding([1, 1]),
            )
        } else {
            avg_pool_3x3(x)
        };
        Tensor::cat(vec![b1, b3, dbl, self.pool.forward(pooled)], 1)
    }
}

/// The FID Inception-v3 up to pool3.
#[derive(Debug, Clone)]
pub struct FidInception {
    stem: Vec<BasicConv>,
    a: [BlockA; 3],
    b: BlockB,
    c: [BlockC; 4],
    d: BlockD,
    e: [BlockE; 2],
}

impl FidInception {
    /// Builds the network from tensors under pytorch-fid's names (extra tensors such as `fc.*`
    /// are ignored). Errors name the first missing or misshapen tensor.
    pub fn from_tensors(
        tensors: &HashMap<String, HostTensor>,
        device: &Device,
    ) -> std::result::Result<Self, String> {
        Self::build(&Builder {
            tensors: Some(tensors),
            device,
        })
    }

    /// The network with the closed-formula weights of `tests/fixtures/make_inception_fixture.py`
    /// (parity tests without the real weights): base[i] = sin(0.7·i + 2π·h), h = (Σ bytes of
    /// the tensor's name mod 97)/97, scaled per kind of tensor as the script says.
    pub fn formula_weights(device: &Device) -> Self {
        Self::build(&Builder {
            tensors: None,
            device,
        })
        .expect("the formula gives every tensor")
    }

    fn build(b: &Builder) -> std::result::Result<Self, String> {
        Ok(FidInception {
            stem: vec![
                b.conv("Conv2d_1a_3x3", 3, 32, [3, 3], 2, [0, 0])?,
                b.conv("Conv2d_2a_3x3", 32, 32, [3, 3], 1, [0, 0])?,
                b.conv("Conv2d_2b_3x3", 32, 64, [3, 3], 1, [1, 1])?,
                b.conv("Conv2d_3b_1x1", 64, 80, [1, 1], 1, [0, 0])?,
                b.conv("Conv2d_4a_3x3", 80, 192, [3, 3], 1, [0, 0])?,
            ],
            a: [
                BlockA::new(b, "Mixed_5b", 192, 32)?,
                BlockA::new(b, "Mixed_5c", 256, 64)?,
                BlockA::new(b, "Mixed_5d", 288, 64)?,
            ],
            b: BlockB::new(b, "Mixed_6a", 288)?,
            c: [
                BlockC::new(b, "Mixed_6b", 128)?,
                BlockC::new(b, "Mixed_6c", 160)?,
                BlockC::new(b, "Mixed_6d", 160)?,
                BlockC::new(b, "Mixed_6e", 192)?,
            ],
            d: BlockD::new(b, "Mixed_7a")?,
            e: [
                BlockE::new(b, "Mixed_7b", 1280, false)?,
                BlockE::new(b, "Mixed_7c", 2048, true)?,
            ],
        })
    }

    /// Loads the weights from a `.pth` (pickle-free reader) or `.safetensors` file.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let tensors = read_weights(path)?;
        Self::from_tensors(&tensors, device).map_err(|e| {
            Error::file(
                path,
                format!("{e}: expected pytorch-fid's Inception weights ({FID_WEIGHTS_FILE})"),
            )
        })
    }

    /// Images in [0, 1], [B, 3, H, W] → pool3 features [B, 2048].
    pub fn features(&self, images: Tensor<4>) -> Tensor<2> {
        let x = interpolate(
            images,
            InterpolateOptions::new(InterpolateMode::Bilinear)
                .with_align_corners(false)
                .with_output_size([299, 299]),
        );
        let mut x = x * 2.0 - 1.0;
        for (i, conv) in self.stem.iter().enumerate() {
            x = conv.forward(x);
            if i == 2 || i == 4 {
                x = max_pool_3x3_s2(x); // after Conv2d_2b and Conv2d_4a
            }
        }
        for block in &self.a {
            x = block.forward(x);
        }
        x = self.b.forward(x);
        for block in &self.c {
            x = block.forward(x);
        }
        x = self.d.forward(x);
        for block in &self.e {
            x = block.forward(x);
        }
        let [b, c, _, _] = x.dims();
        adaptive_avg_pool2d(x, [1, 1]).reshape([b, c])
    }
}

/// Float tensors of a `.pth` (read as data by burn's PyTorch reader: no pickle code runs) or a
/// `.safetensors` file, by name.
pub fn read_weights(path: &Path) -> Result<HashMap<String, HostTensor>> {
    if !path.is_file() {
        return Err(Error::file(
            path,
            format!(
                "--inception-weights: file not found; fewstep does not download it — fetch {FID_WEIGHTS_FILE} from {FID_WEIGHTS_URL}"
            ),
        ));
    }
    let is_safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if is_safetensors {
        return io::read_safetensors(path);
    }
    let reader = burn::store::pytorch_reader::PytorchReader::new(path).map_err(|e| {
        Error::file(
            path,
            format!("not a readable PyTorch file ({e}); expected {FID_WEIGHTS_FILE} or a .safetensors conversion"),
        )
    })?;
    let mut out = HashMap::new();
    for (name, t) in reader.into_tensors() {
        if name.ends_with("num_batches_tracked") {
            continue;
        }
        use burn::store::pytorch_reader::DType as P;
        use safetensors::Dtype as S;
        let shape = t.shape().to_vec();
        let dtype = match t.dtype() {
            P::F32 => S::F32,
            P::F16 => S::F16,
            P::BF16 => S::BF16,
            P::F64 => S::F64,
            other => {
                return Err(Error::file(
                    path,
                    format!("tensor `{name}` has dtype {other:?}; expected a float type"),
                ));
            }
        };
        let bytes = t
            .read()
            .map_err(|e| Error::file(path, format!("tensor `{name}`: {e}")))?;
        let data = io::to_f32(dtype, &bytes).expect("float dtype");
        out.insert(name, HostTensor { shape, data });
    }
    Ok(out)
}

fn formula(name: &str, shape: &[usize]) -> HostTensor {
    let n: usize = shape.iter().product();
    let h = (name.bytes().map(|b| b as u64).sum::<u64>() % 97) as f64 / 97.0;
    let base = |i: usize| (0.7 * i as f64 + 2.0 * std::f64::consts::PI * h).sin();
    let value = |i: usize| -> f64 {
        let b = base(i);
        if name.ends_with("bn.weight") {
            1.0 + 0.1 * b
        } else if name.ends_with("bn.bias") {
            0.1 * b
        } else if name.ends_with("running_mean") {
            0.05 * b
        } else if name.ends_with("running_var") {
            1.0 + 0.1 * b * b
        } else {
            let fan_in: usize = shape[1..].iter().product();
            b / (fan_in as f64).sqrt()
        }
    };
    HostTensor {
        shape: shape.to_vec(),
        data: (0..n).map(|i| value(i) as f32).collect(),
    }
}
