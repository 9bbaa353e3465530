// A consumer's program: uses lcm's domain and JSON codecs through the installed package.
#include <lcm/domain/json.hpp>
#include <lcm/domain/worker.hpp>

#include <boost/json/serialize.hpp>

#include <iostream>

int main()
{
    auto worker = lcm::domain::cml_worker::create("consumer-1", "consumer", "https://127.0.0.1:8443",
                                                  lcm::domain::worker_status::running, "consumer");
    if (!worker) {
        return 1;
    }
    auto operation = worker.value().request_license_registration(lcm::secret("TOKEN"), false, "consumer");
    if (!operation || operation.value() != 1) {
        return 1;
    }
    const auto text = boost::json::serialize(lcm::domain::to_public_json(worker.value()));
    if (text.find("TOKEN\"") != std::string::npos) {
        return 1;
    }
    std::cout << "lcm consumer ok\n";
    return 0;
}
