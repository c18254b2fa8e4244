// The one translation unit that compiles Asio's implementation
// (ASIO_SEPARATE_COMPILATION is set for every user of kvlink).
#include <asio/impl/src.hpp>
