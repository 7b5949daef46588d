//! Reading and editing the domain XML `<clock>` element with an XML library.
