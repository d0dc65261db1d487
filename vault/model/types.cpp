#include "vault/model/types.hpp"

#include <chrono>

namespace vaultfs::vault {

Micros now_micros()
{
    using namespace std::chrono;
    return duration_cast<microseconds>(system_clock::now().time_since_epoch()).count();
}

}  // namespace vaultfs::vault
