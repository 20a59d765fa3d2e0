//! Conversions between Python objects and the runtime's types: token ids in, float32 numpy
//! arrays out (one copy: tensor -> `Vec<f32>` -> array that owns the vector), JSON values
//! to Python objects.

use hooks::candle_core::{DType, Device, Tensor};
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{IntoPyArray, PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use serde_json::Value;

/// A tensor copied to host memory as float32, with its shape. Built without the GIL.
pub struct HostArray {
    /// Row-major elements.
    pub data: Vec<f32>,
    /// Shape.
    pub dims: Vec<usize>,
}

impl HostArray {
    /// Copies a tensor of any float dtype on any device to host float32.
    pub fn from_tensor(tensor: &Tensor) -> hooks::Result<Self> {
        let dims = tensor.dims().to_vec();
        let data = tensor
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(HostArray { data, dims })
    }

    /// Drops a leading batch dimension of size 1 (for inputs given as 1-D ids).
    pub fn squeeze_batch(mut self, squeeze: bool) -> Self {
        if squeeze && self.dims.len() > 1 && self.dims[0] == 1 {
            self.dims.remove(0);
        }
        self
    }

    /// The numpy array, owning this data (no further copy).
    pub fn into_numpy(self, py: Python<'_>) -> PyResult<Bound<'_, PyArrayDyn<f32>>> {
        let array = ArrayD::from_shape_vec(IxDyn(&self.dims), self.data)
            .map_err(|e| PyValueError::new_err(format!("internal shape error: {e}")))?;
        Ok(array.into_pyarray(py))
    }
}

/// Token ids read from Python: `[seq]` or `[batch, seq]`.
pub struct TokenIds {
    /// The ids as a `[batch, seq]` int64 tensor on the CPU.
    pub tensor: Tensor,
    /// Whether the input was 1-D (outputs then drop the batch dimension).
    pub one_dim: bool,
}

impl TokenIds {
    /// The shape the ids were given in: `[seq]` or `[batch, seq]`.
    pub fn user_dims(&self) -> Vec<usize> {
        let dims = self.tensor.dims();
        dims[usize::from(self.one_dim)..].to_vec()
    }

    /// Tokens per sequence.
    pub fn seq_len(&self) -> usize {
        self.tensor.dims()[1]
    }

    /// `[batch, ..per_sequence]`: the shape of a tensor with `per_sequence` per sequence.
    pub fn batched(&self, per_sequence: &[usize]) -> Vec<usize> {
        std::iter::once(self.tensor.dims()[0])
            .chain(per_sequence.iter().copied())
            .collect()
    }
}

/// `numpy.asarray(obj)` followed by `numpy.ascontiguousarray(..., dtype)`.
fn as_numpy<'py>(obj: &Bound<'py, PyAny>, dtype: Option<&str>) -> PyResult<Bound<'py, PyAny>> {
    let np = obj.py().import("numpy")?;
    let array = np.call_method1("asarray", (obj,))?;
    match dtype {
        None => Ok(array),
        Some(dtype) => np.call_method1("ascontiguousarray", (array, dtype)),
    }
}

/// An integer numpy array as contiguous int64. The first uint64 value past int64's range is
/// refused with `out_of_range(value, flat position)` naming its true value (a plain cast would
/// make it negative).
pub fn checked_int64<'py>(
    array: &Bound<'py, PyAny>,
    out_of_range: impl Fn(u64, usize) -> String,
) -> PyResult<Bound<'py, PyAny>> {
    let dtype = array.getattr("dtype")?;
    let unsigned_64 = dtype.getattr("kind")?.extract::<String>()? == "u"
        && dtype.getattr("itemsize")?.extract::<usize>()? == 8;
    if unsigned_64 && array.getattr("size")?.extract::<usize>()? > 0 {
        let flat = array.call_method1("reshape", (-1,))?;
        let past = flat.call_method1("__gt__", (i64::MAX,))?;
        let position: usize = past.call_method0("argmax")?.extract()?;
        if past.get_item(position)?.extract::<bool>()? {
            let value: u64 = flat.get_item(position)?.extract()?;
            return Err(PyValueError::new_err(out_of_range(value, position)));
        }
    }
    as_numpy(array, Some("int64"))
}

/// [`checked_int64`] for token ids.
pub fn checked_token_ids<'py>(array: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    checked_int64(array, |id, position| {
        format!("token id {id} at position {position} is out of range")
    })
}

/// Reads token ids from any integer numpy array, list or nested list of ints.
pub fn token_ids(obj: &Bound<'_, PyAny>) -> PyResult<TokenIds> {
    let array = as_numpy(obj, None)?;
    let dtype = array.getattr("dtype")?;
    let kind: String = dtype.getattr("kind")?.extract()?;
    let size: usize = array.getattr("size")?.extract()?;
    let ndim: usize = array.getattr("ndim")?.extract()?;
    if size == 0 {
        return Err(PyValueError::new_err(format!(
            "token ids are empty (shape {})",
            array.getattr("shape")?.repr()?
        )));
    }
    if kind != "i" && kind != "u" {
        return Err(PyTypeError::new_err(format!(
            "token ids must be integers, got an array of dtype {}",
            dtype.str()?
        )));
    }
    if ndim != 1 && ndim != 2 {
        return Err(PyValueError::new_err(format!(
            "token ids must have shape [seq] or [batch, seq], got shape {}",
            array.getattr("shape")?.repr()?
        )));
    }
    let array = checked_token_ids(&array)?;
    let array: PyReadonlyArrayDyn<'_, i64> = array.extract()?;
    let dims = array.shape().to_vec();
    let data: Vec<i64> = match array.as_slice() {
        Ok(slice) => slice.to_vec(),
        Err(_) => array.as_array().iter().copied().collect(),
    };
    let one_dim = dims.len() == 1;
    let shape = if one_dim {
        vec![1, dims[0]]
    } else {
        dims.clone()
    };
    let tensor = Tensor::from_vec(data, shape, &Device::Cpu)
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(TokenIds { tensor, one_dim })
}

/// Reads a float array (any float or integer numpy array or nested list) as float32 data
/// and its shape. Anything else (booleans, complex numbers, strings, objects) is a TypeError
/// naming `what` (say, "the hook at 'layers.0' returned"), not a silent conversion.
pub fn float_array(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<HostArray> {
    let array = as_numpy(obj, None)?;
    let dtype = array.getattr("dtype")?;
    if !matches!(
        dtype.getattr("kind")?.extract::<String>()?.as_str(),
        "f" | "i" | "u"
    ) {
        return Err(PyTypeError::new_err(format!(
            "{what} an array of dtype {}; expected floats (or integers)",
            dtype.str()?
        )));
    }
    let array = as_numpy(&array, Some("float32"))?;
    let array: PyReadonlyArrayDyn<'_, f32> = array.extract()?;
    let dims = array.shape().to_vec();
    let data: Vec<f32> = match array.as_slice() {
        Ok(slice) => slice.to_vec(),
        Err(_) => array.as_array().iter().copied().collect(),
    };
    Ok(HostArray { data, dims })
}

/// An int64 numpy array of the given shape.
pub fn int64_array<'py>(
    py: Python<'py>,
    data: Vec<i64>,
    dims: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    let array = ArrayD::from_shape_vec(IxDyn(dims), data)
        .map_err(|e| PyValueError::new_err(format!("internal shape error: {e}")))?;
    Ok(array.into_pyarray(py).into_any())
}

/// A JSON value as Python objects (dict, list, str, int, float, bool, None).
pub fn json_to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => s.into_pyobject(py)?.into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(json_to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (key, item) in map {
                dict.set_item(key, json_to_py(py, item)?)?;
            }
            dict.into_any()
        }
    })
}
