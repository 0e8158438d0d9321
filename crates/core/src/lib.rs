//! The part of the fracture detector that runs everywhere: natively, in the
//! trainer, and in the browser (wasm32). It knows nothing about files or
//! threads: bytes come in, probabilities and heat maps go out.
//!
//! Data flows one way: bytes → [`preprocess`] → tensor → [`models`] →
//! probability ([`predict`]). The model file ([`weights`]) carries its own
//! [`card`], so nothing about preprocessing is hard-coded a second time.

pub mod cam;
pub mod card;
pub mod dicom;
pub mod error;
pub mod models;
pub mod ops;
pub mod predict;
pub mod preprocess;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tracked;
pub mod weights;

pub use card::{Architecture, Classes, ModelCard, OperatingPoint, OperatingPoints, Preprocessing, TtaView};
pub use error::{Error, Result};
pub use models::{Mode, Model};
pub use predict::{Prediction, Predictor};
