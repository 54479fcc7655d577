// What the unit tests check of a call that must be refused: the code of the
// pgphi::Error it throws (and, on request, its message). Any other outcome,
// a call that succeeds or another exception, fails the test.
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <stdexcept>
#include <string>

#include "error.hpp"

namespace pgphi::test_support {

inline ErrorCode refusal(const std::function<void()>& fn, std::string* message = nullptr)
{
    try {
        fn();
    } catch (const Error& e) {
        if (message)
            *message = e.what();
        return e.code();
    } catch (const std::exception& e) {
        ADD_FAILURE() << "not a pgphi::Error: " << e.what();
        return ErrorCode::Internal;
    }
    ADD_FAILURE() << "accepted";
    return ErrorCode::Internal;
}

// The message of the refusal ("accepted" when there was none).
inline std::string refusal_text(const std::function<void()>& fn)
{
    try {
        fn();
    } catch (const Error& e) {
        return e.what();
    }
    return "accepted";
}

} // namespace pgphi::test_support
