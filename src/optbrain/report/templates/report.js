(function(){
  var ths = document.querySelectorAll("table.layers th");
  ths.forEach(function(th, col){
    th.addEventListener("click", function(){
      var body = th.closest("table").tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute("data-dir") !== "asc";
      th.setAttribute("data-dir", asc ? "asc" : "desc");
      function key(row){
        var c = row.cells[col], v = c.getAttribute("data-v");
        return v === null ? c.textContent : v;
      }
      rows.sort(function(a, b){
        var x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y), d;
        if (x === "" || y === "") { d = (x === "") - (y === ""); return d; }
        d = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
        return asc ? d : -d;
      });
      rows.forEach(function(r){ body.appendChild(r); });
    });
  });
})();
