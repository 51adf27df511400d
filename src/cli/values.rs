//! Range-checked parsers for numeric flags. Every numeric flag of every command goes through one
//! of these, so a value out of range is refused at parse time in one line that names the flag
//! (`error: invalid value '-1' for '--lr <LR>': expected a positive number`). Negative numbers
//! are parsed as values, not taken for flags (see [`super::command`]).

use std::str::FromStr;

use crate::train::timesteps::TimestepSampling;

fn number<T: FromStr>(s: &str) -> Result<T, String> {
    s.trim()
        .parse::<T>()
        .map_err(|_| "expected a number".to_string())
}

fn float<T: FromStr + Into<f64> + Copy>(s: &str) -> Result<T, String> {
    let v: T = number(s)?;
    if v.into().is_finite() {
        Ok(v)
    } else {
        Err("expected a finite number".into())
    }
}

/// A finite number > 0 (learning rates, clipping norms, widths, scalings).
pub fn positive_f64(s: &str) -> Result<f64, String> {
    let v: f64 = float(s)?;
    if v > 0.0 {
        Ok(v)
    } else {
        Err("expected a positive number".into())
    }
}

/// A finite number > 0.
pub fn positive_f32(s: &str) -> Result<f32, String> {
    let v: f32 = float(s)?;
    if v > 0.0 {
        Ok(v)
    } else {
        Err("expected a positive number".into())
    }
}

/// A finite number ≥ 0 (loss weights, guidance scales).
pub fn non_negative_f64(s: &str) -> Result<f64, String> {
    let v: f64 = float(s)?;
    if v >= 0.0 {
        Ok(v)
    } else {
        Err("expected a number ≥ 0".into())
    }
}

/// A finite number ≥ 0.
pub fn non_negative_f32(s: &str) -> Result<f32, String> {
    let v: f32 = float(s)?;
    if v >= 0.0 {
        Ok(v)
    } else {
        Err("expected a number ≥ 0".into())
    }
}

/// Any finite number (a LoRA scale may be negative: the adapter subtracted).
pub fn finite_f32(s: &str) -> Result<f32, String> {
    float(s)
}

/// A probability in [0, 1].
pub fn probability(s: &str) -> Result<f32, String> {
    let v: f32 = float(s)?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err("expected a probability in [0, 1]".into())
    }
}

/// An EMA decay in [0, 1).
pub fn decay(s: &str) -> Result<f32, String> {
    let v: f32 = float(s)?;
    if (0.0..1.0).contains(&v) {
        Ok(v)
    } else {
        Err("expected a decay in [0, 1)".into())
    }
}

/// A count ≥ 1 (steps, batches, iterations, samples, ranks).
pub fn count(s: &str) -> Result<usize, String> {
    let v: usize = s
        .trim()
        .parse()
        .map_err(|_| "expected a whole number ≥ 1".to_string())?;
    if v >= 1 {
        Ok(v)
    } else {
        Err("expected a whole number ≥ 1".into())
    }
}

/// A whole number ≥ 0 (seeds, warm-up lengths, class labels).
pub fn whole(s: &str) -> Result<usize, String> {
    s.trim()
        .parse()
        .map_err(|_| "expected a whole number ≥ 0".to_string())
}

/// A seed: a whole number ≥ 0.
pub fn seed(s: &str) -> Result<u64, String> {
    s.trim()
        .parse()
        .map_err(|_| "expected a whole number ≥ 0".to_string())
}

/// A list of training timesteps (one flag value: clap would take a bare `Vec` for repeats).
#[derive(Debug, Clone, PartialEq)]
pub struct Timesteps(pub Vec<i64>);

/// Training timesteps, comma-separated (`999,339`); order and range are checked by the
/// scheduler, which knows its number of training timesteps.
pub fn timesteps(s: &str) -> Result<Timesteps, String> {
    s.split(',')
        .map(|t| t.trim().parse::<i64>())
        .collect::<Result<Vec<_>, _>>()
        .map(Timesteps)
        .map_err(|_| "expected whole numbers separated by commas, e.g. 999,339".to_string())
}

/// A timestep law: `uniform`, `lognormal` (EDM's mean −1.2, std 1.2) or `lognormal:MEAN,STD`
/// (a finite mean, a positive std).
pub fn timestep_sampling(s: &str) -> Result<TimestepSampling, String> {
    timestep_law(s, TimestepSampling::EDM)
}

/// `distill consistency --timestep-sampling`: as [`timestep_sampling`], `lognormal` alone being
/// iCT's law over the consistency grid.
pub fn consistency_timestep_sampling(s: &str) -> Result<TimestepSampling, String> {
    timestep_law(s, TimestepSampling::ICT)
}

/// `uniform`, `lognormal` (the command's paper's law, `bare`) or `lognormal:MEAN,STD`.
fn timestep_law(s: &str, bare: TimestepSampling) -> Result<TimestepSampling, String> {
    const EXPECTED: &str = "expected uniform, lognormal or lognormal:MEAN,STD (e.g. lognormal:0,1)";
    match s.trim() {
        "uniform" => Ok(TimestepSampling::Uniform),
        "lognormal" => Ok(bare),
        other => {
            let (mean, std) = other
                .strip_prefix("lognormal:")
                .and_then(|rest| rest.split_once(','))
                .ok_or_else(|| EXPECTED.to_string())?;
            let mean: f64 =
                float(mean).map_err(|_| format!("{EXPECTED}: the mean is not a finite number"))?;
            let std = positive_f64(std)
                .map_err(|_| format!("{EXPECTED}: the std is not a positive number"))?;
            Ok(TimestepSampling::LogNormal { mean, std })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_refuse_what_they_should_and_take_the_rest() {
        assert_eq!(positive_f64("2e-4"), Ok(2e-4));
        assert!(positive_f64("-1").is_err());
        assert!(positive_f64("0").is_err());
        assert!(positive_f64("nan").is_err());
        assert!(positive_f64("inf").is_err());
        assert!(positive_f64("abc").is_err());
        assert_eq!(timesteps("999, 339"), Ok(Timesteps(vec![999, 339])));
        assert!(timesteps("999,,339").is_err());
        assert!(timesteps("a").is_err());
        assert_eq!(non_negative_f32("0"), Ok(0.0));
        assert!(non_negative_f32("-0.5").is_err());
        assert_eq!(probability("1"), Ok(1.0));
        assert!(probability("2").is_err());
        assert_eq!(decay("0"), Ok(0.0));
        assert!(decay("1").is_err());
        assert_eq!(count("3"), Ok(3));
        assert!(count("0").is_err());
        assert!(count("-1").is_err());
        assert_eq!(whole("0"), Ok(0));
        assert_eq!(finite_f32("-2"), Ok(-2.0));
        assert!(finite_f32("inf").is_err());
        assert!(seed("-3").is_err());
        assert_eq!(timestep_sampling("uniform"), Ok(TimestepSampling::Uniform));
        assert_eq!(timestep_sampling("lognormal"), Ok(TimestepSampling::EDM));
        assert_eq!(
            consistency_timestep_sampling("lognormal"),
            Ok(TimestepSampling::ICT)
        );
        assert_eq!(
            consistency_timestep_sampling("lognormal:0,1"),
            timestep_sampling("lognormal:0,1")
        );
        assert_eq!(
            timestep_sampling("lognormal:0, 1"),
            Ok(TimestepSampling::LogNormal {
                mean: 0.0,
                std: 1.0
            })
        );
        assert_eq!(
            timestep_sampling("lognormal:-1.2,0.5"),
            Ok(TimestepSampling::LogNormal {
                mean: -1.2,
                std: 0.5
            })
        );
        for bad in [
            "normal",
            "lognormal:0",
            "lognormal:0,0",
            "lognormal:x,1",
            "lognormal:0,-1",
        ] {
            assert!(timestep_sampling(bad).is_err(), "{bad}");
        }
    }
}
