// The Catch2 main shared by every unit-test executable. Secret buffers come
// from the locked heap, which must exist before the first test runs.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>

#include "hsm/secure_buffer.hpp"

int main(int argc, char* argv[])
{
    if (auto heap = vaultfs::hsm::init_secure_heap(8 << 20); !heap) {
        std::fprintf(stderr, "test main: %s\n", heap.error().message.c_str());
        return 1;
    }
    return Catch::Session().run(argc, argv);
}
