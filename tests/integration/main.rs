mod support;
mod validate;
