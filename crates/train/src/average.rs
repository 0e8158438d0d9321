//! Polyak averaging: an exponential moving average of every weight and
//! running statistic, updated after each optimiser step. On a small data set
//! the weights of consecutive steps scatter around a good solution; their
//! average sits nearer its middle than any one of them.

use std::collections::HashMap;

use candle_core::{Result, Tensor, Var};

use crate::params::Params;

/// Names of the averages in a checkpoint: `average.` and the weight's name.
pub(crate) const PREFIX: &str = "average.";

pub struct WeightAverage {
    decay: f64,
    /// Updates so far; early ones use a smaller decay (see [`WeightAverage::update`]).
    pub updates: usize,
    /// (name, the live variable, its average), in name order.
    slots: Vec<(String, Var, Tensor)>,
}

impl WeightAverage {
    /// Starts at the current weights.
    pub fn new(params: &Params, decay: f64) -> Result<Self> {
        let mut slots: Vec<(String, Var, Tensor)> = params
            .vars()
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.clone(), var.as_tensor().copy()?)))
            .collect::<Result<_>>()?;
        slots.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self {
            decay,
            updates: 0,
            slots,
        })
    }

    /// average ← d·average + (1-d)·weights, with d = min(decay, (1+n)/(10+n))
    /// so that the first updates are not tied to the random initial weights.
    pub fn update(&mut self) -> Result<()> {
        let n = self.updates as f64;
        let decay = self.decay.min((1.0 + n) / (10.0 + n));
        for (_, var, average) in &mut self.slots {
            *average = ((&*average * decay)? + (var.as_tensor().detach() * (1.0 - decay))?)?;
        }
        self.updates += 1;
        Ok(())
    }

    /// Exchanges the live weights and the averages; twice restores both.
    pub fn swap(&mut self) -> Result<()> {
        for (_, var, average) in &mut self.slots {
            let live = var.as_tensor().copy()?;
            var.set(average)?;
            *average = live;
        }
        Ok(())
    }

    /// The averages as checkpoint tensors.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.slots
            .iter()
            .map(|(name, _, average)| (format!("{PREFIX}{name}"), average.clone()))
            .collect()
    }

    /// Restores the averages saved by [`WeightAverage::tensors`].
    pub fn load(&mut self, tensors: &HashMap<String, Tensor>, updates: usize) -> Result<()> {
        for (name, _, average) in &mut self.slots {
            let saved = tensors
                .get(&format!("{PREFIX}{name}"))
                .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint lacks the average of `{name}`")))?;
            *average = saved.copy()?;
        }
        self.updates = updates;
        Ok(())
    }
}
