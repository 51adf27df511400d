//! Distillation objectives, one per file, as pure functions returning a per-sample loss: each a
//! target (from [`crate::denoiser`]'s arithmetic on the teacher) plus a loss.

pub mod consistency;
pub mod dmd;
pub mod gan;
pub mod progressive;

/// A v-prediction, cosine-schedule, trailing-spacing DDIM config (the shipped teacher's) for the
/// objectives' unit tests.
#[cfg(test)]
pub(crate) fn test_scheduler_config() -> fewstep_schedulers::SchedulerConfig {
    fewstep_schedulers::SchedulerConfig::from_json_str(
        r#"{"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2",
            "prediction_type": "v_prediction", "timestep_spacing": "trailing",
            "set_alpha_to_one": true, "clip_sample": false}"#,
    )
    .unwrap()
}
