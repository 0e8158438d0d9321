use thiserror::Error;

/// Everything that can go wrong between bytes and a probability.
///
/// Messages name what was expected, so a user can tell a wrong file from a bug.
#[derive(Debug, Error)]
pub enum Error {
    #[error("cannot decode image: {0}")]
    Decode(String),

    #[error("unsupported image: {0}")]
    UnsupportedImage(String),

    /// A DICOM file whose pixel encoding has no decoder here (JPEG-LS and
    /// JPEG 2000 need C libraries, which the browser build cannot link).
    /// Named so a user knows what to convert the file to.
    #[error("unsupported DICOM transfer syntax {name} ({uid})")]
    UnsupportedTransferSyntax { name: String, uid: String },

    #[error("not a model file: {0}")]
    NotAModelFile(String),

    #[error("model card: {0}")]
    Card(String),

    #[error("weights do not match the {architecture} architecture: {message}")]
    WeightsMismatch { architecture: String, message: String },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
